"""One job-file reader (contract/job_file.py) for both command lines: the same file, the same faults."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli.main import UsageError, build_parser, job_request
from contract.job_file import ENGINE_KEYS, SERVICE_KEYS, JobFileError, read_job_file
from worker.training.cli import main as engine_main

JOB = {"base_model": "models/tiny", "train_file": "train.jsonl", "output_dir": "out", "hyperparameters": {"lora_r": 8}}


@pytest.mark.parametrize("name, text", [("job.yaml", "base_model: models/tiny\ntrain_file: train.jsonl\noutput_dir: out\n"
                                                     "hyperparameters: {lora_r: 8}\n"),
                                        ("job.json", json.dumps(JOB))])
def test_yaml_and_json_read_the_same(tmp_path: Path, name, text):
    path = tmp_path / name
    path.write_text(text)
    assert read_job_file(path, ENGINE_KEYS) == JOB == read_job_file(path, SERVICE_KEYS)


@pytest.mark.parametrize("text, needle", [
    ("base_model: [unclosed\n", "not valid YAML"),
    ("- a list\n", "expected a mapping at the top level"),
    ("base_model: m\nsuffix: s\n", "unknown keys ['suffix']"),  # the service's key, not the engine's
    ("base_model: m\nhyperparameters: [1, 2]\n", "hyperparameters must be a mapping"),
])
def test_a_bad_file_is_the_same_fault_for_both_command_lines(tmp_path: Path, capsys, text, needle):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(JobFileError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        read_job_file(path, ENGINE_KEYS)
    assert engine_main([str(path)]) == 2
    assert needle in capsys.readouterr().err
    if "suffix" not in text:  # the service's command line allows suffix
        with pytest.raises(UsageError, match=needle.replace("[", r"\[").replace("]", r"\]")):
            job_request(build_parser().parse_args(["jobs", "create", "-f", str(path)]))


def test_an_unreadable_file_is_named(tmp_path: Path):
    with pytest.raises(JobFileError, match="cannot read"):
        read_job_file(tmp_path / "missing.yaml", ENGINE_KEYS)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(JobFileError, match="not valid JSON"):
        read_job_file(tmp_path / "bad.json", SERVICE_KEYS)
