"""The command line's pure parts in-process: formatting, the error line, the job request built from a job file and
flags, and the progress bar on a terminal. The commands against a running service: tests/e2e/test_cli.py."""

from __future__ import annotations

import io
from pathlib import Path

import httpx2
import openai
import pytest

from cli import output
from cli.main import UsageError, build_parser, job_request
from cli.watch import Display


def status_error(status: int, body: dict) -> openai.APIStatusError:
    """What the SDK raises for an error envelope: the exception gets the envelope's inner `error` object."""
    request = httpx2.Request("GET", "http://127.0.0.1:8000/v1/fine_tuning/jobs/x")
    response = httpx2.Response(status, request=request, json={"error": body})
    cls = {400: openai.BadRequestError, 401: openai.AuthenticationError}[status]
    return cls(f"Error code: {status} - {body}", response=response, body=body)


def test_api_error_line_has_the_status_code_param_and_message():
    exc = status_error(400, {"message": "Invalid 'lora_rank': unknown option.", "type": "invalid_request_error",
                             "param": "hyperparameters.lora_rank", "code": "invalid_value"})
    assert output.api_error_line(exc, "http://x/v1") == (
        "error [400, invalid_value, param hyperparameters.lora_rank]: Invalid 'lora_rank': unknown option.")
    unauthorized = status_error(401, {"message": "Invalid API key.", "type": "invalid_request_error", "param": None, "code": "invalid_api_key"})
    assert output.api_error_line(unauthorized, "http://x/v1").startswith("error [401, invalid_api_key]: Invalid API key. (check --api-key")


def test_progress_line_and_eta():
    data = {"step": 3, "total_steps": 8, "train_loss": 2.43125, "valid_loss": 2.301, "learning_rate": 0.001,
            "tokens_per_second": 1234.4, "step_seconds": 2.5}
    assert output.progress_line(data) == "step 3/8 (37%)  loss 2.4312  valid 2.3010  lr 1.00e-03  1,234 tok/s  ETA 0:12"
    assert output.progress_fields(data)["eta_seconds"] == 12.5
    assert output.progress_line({"step": 1}) == "step 1/?"
    dpo = {"step": 2, "total_steps": 4, "train_loss": 0.6, "train_rewards_accuracies": 0.75, "train_rewards_margins": 0.0421}
    assert output.progress_line(dpo) == "step 2/4 (50%)  loss 0.6000  reward acc 0.750  margin 0.042"
    assert output.progress_fields(dpo)["train_rewards_accuracies"] == 0.75
    assert output.duration(3725) == "1:02:05" and output.duration(None) == "?"


def test_fault_lines_split_the_apis_summary():
    details = "line 3: invalid_file_format: not valid JSON; line 5: invalid_role: bad role; (12 problems in all)"
    assert output.fault_lines(details) == ["line 3: invalid_file_format: not valid JSON", "line 5: invalid_role: bad role",
                                           "(12 problems in all)"]


def test_flags_win_over_the_job_file(tmp_path: Path):
    job_file = tmp_path / "job.yaml"
    job_file.write_text("base_model: ../.qlora/models/SmolLM2-135M-Instruct\ntrain_file: facts.jsonl\nsuffix: yaml\n"
                        "hyperparameters: {lora_r: 16, max_steps: 12}\n")
    args = build_parser().parse_args(["jobs", "create", "-f", str(job_file), "--suffix", "flag", "--max-steps", "4",
                                      "-p", "quant_type=fp4", "-p", "learning_rate=1e-3", "--metadata", "team=a"])
    request, here = job_request(args)
    assert here == tmp_path
    assert request["model"] == "SmolLM2-135M-Instruct" and request["training_file"] == "facts.jsonl" and request["suffix"] == "flag"
    assert request["method"]["supervised"]["hyperparameters"] == {"lora_r": 16, "max_steps": 4, "quant_type": "fp4", "learning_rate": 0.001}
    assert request["metadata"] == {"team": "a"}
    job_file.write_text("model: m\ntrain_file: t\noutput: x\n")
    with pytest.raises(UsageError, match="unknown keys"):
        job_request(args)
    with pytest.raises(UsageError, match="--training-file"):
        job_request(build_parser().parse_args(["jobs", "create", "-m", "m"]))


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_method_flag_names_where_the_hyperparameters_go():
    args = build_parser().parse_args(["jobs", "create", "-m", "m", "-t", "t", "--method", "dpo", "--lora-r", "8"])
    assert job_request(args)[0]["method"] == {"type": "dpo", "dpo": {"hyperparameters": {"lora_r": 8}}}
    plain = build_parser().parse_args(["jobs", "create", "-m", "m", "-t", "t"])
    assert "method" not in job_request(plain)[0]  # the service's default method, with default hyperparameters


def test_dpo_flags_and_an_engine_job_file_that_names_its_method(tmp_path: Path):
    args = build_parser().parse_args(["jobs", "create", "-m", "m", "-t", "t", "--method", "dpo", "--beta", "0.2", "--loss-type", "ipo",
                                      "--rpo-alpha", "1"])
    assert job_request(args)[0]["method"] == {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "loss_type": "ipo", "rpo_alpha": 1.0}}}
    auto = build_parser().parse_args(["jobs", "create", "-m", "m", "-t", "t", "--method", "dpo", "--beta", "auto"])
    assert job_request(auto)[0]["method"]["dpo"]["hyperparameters"] == {"beta": "auto"}
    with pytest.raises(SystemExit):  # argparse: not a number
        build_parser().parse_args(["jobs", "create", "--beta", "high"])
    # The engine CLI's job file names the method among its hyperparameters; the API takes it as method.type.
    job_file = tmp_path / "dpo.yaml"
    job_file.write_text("model: m\ntrain_file: pairs.jsonl\nhyperparameters: {method: dpo, beta: 0.1, max_steps: 4}\n")
    from_file = job_request(build_parser().parse_args(["jobs", "create", "-f", str(job_file)]))[0]
    assert from_file["method"] == {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1, "max_steps": 4}}}
    overridden = job_request(build_parser().parse_args(["jobs", "create", "-f", str(job_file), "--method", "supervised"]))[0]
    assert overridden["method"]["type"] == "supervised"


def test_on_a_terminal_progress_is_a_bar_with_events_above_it():
    out = Terminal()
    args = build_parser().parse_args(["jobs", "watch", "ftjob-x"])
    ctx = type("Ctx", (), {"json": False, "out": out, "print": lambda self, text: print(text, file=out)})()
    display = Display(ctx, "ftjob-x")
    assert display.mode == "bar" and args.interval == 2.0
    display.event({"type": "message", "level": "info", "message": "Fine-tuning job started", "created_at": 0})
    for step in (1, 2):
        display.event({"type": "metrics", "level": "info", "message": "", "created_at": 0,
                       "data": {"step": step, "total_steps": 4, "train_loss": 1.5, "step_seconds": 1.0}})
    display.finish({"id": "ftjob-x", "status": "cancelled"})
    text = out.getvalue()
    assert "[info] Fine-tuning job started" in text and "step 2/4  50%|" in text and "loss 1.5000" in text and "ETA 0:02" in text
    assert text.rstrip().endswith("job ftjob-x cancelled")
