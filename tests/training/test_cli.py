"""The engine's command line: a job file in, an adapter out; bad input exits 2 with every fault printed."""

import json

import pytest

from worker.training.cli import main


def write_job(tmp_path, model_dir, train_lines, **hyper):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(line) + "\n" for line in train_lines))
    job = tmp_path / "job.yaml"
    job.write_text(f"base_model: {model_dir}\ntrain_file: train.jsonl\noutput_dir: out\n"
                   f"hyperparameters: {json.dumps({'max_steps': 2, 'batch_size': 4, 'micro_batch_size': 4, **hyper})}\n")
    return job


def chat(i):
    return {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}


def test_cli_trains_and_reports(tiny_model_dir, tmp_path, capsys):
    job = write_job(tmp_path, tiny_model_dir, [chat(i) for i in range(12)])
    assert main([str(job)]) == 0
    out = capsys.readouterr().out
    assert '"status": "succeeded"' in out and "adapter" in out
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    records = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "metrics"] == [1, 2]


def test_cli_reports_bad_data_with_line_numbers(tiny_model_dir, tmp_path, capsys):
    lines = [chat(i) for i in range(12)]
    lines[4] = {"messages": [{"role": "bot", "content": "hi"}]}
    job = write_job(tmp_path, tiny_model_dir, lines)
    assert main([str(job)]) == 2
    err = capsys.readouterr().err
    assert "line 5" in err and "bot" in err
    assert not (tmp_path / "out" / "adapter").exists()


@pytest.mark.parametrize("hyper, needle", [({"lora_rank": 4}, "lora_rank"), ({"micro_batch_size": 3}, "micro_batch_size")])
def test_cli_rejects_bad_options(tiny_model_dir, tmp_path, capsys, hyper, needle):
    job = write_job(tmp_path, tiny_model_dir, [chat(i) for i in range(12)], **hyper)
    assert main([str(job)]) == 2
    assert needle in capsys.readouterr().err
