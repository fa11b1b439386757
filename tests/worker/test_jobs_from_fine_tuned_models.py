"""A job that continues from a fine-tuned model through the worker's run_job on a tiny random Llama: an SFT job,
then a DPO job whose `model` is the first one's fine-tuned model. The second starts from a copy of the first's
adapter (its stored archive unchanged), takes that model as its DPO reference, and its model is named after the base."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from core.model_names import adapter_filename
from core.tables import File
from tests.worker.helpers import MODEL, chat_lines, create_job, events, get_job, put_jsonl, stored_config
from tests.worker.test_dpo_runner import pair_lines
from worker import runner


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)  # the engine path is the same on both databases
def test_sft_then_dpo_from_its_fine_tuned_model(make_settings, session_factory, storage):
    settings = make_settings()
    first = create_job(session_factory, storage, training_file=put_jsonl(session_factory, storage, chat_lines(12)),
                       hyper=stored_config(max_steps=2), base_model=MODEL)
    assert runner.run_job(first, settings, session_factory, storage) == runner.SUCCEEDED
    parent = get_job(session_factory, first).fine_tuned_model
    with session_factory() as session:
        source = session.scalar(select(File).where(File.filename == adapter_filename(first)))
    before = b"".join(storage.iter_bytes(source.storage_key))

    second = create_job(session_factory, storage, training_file=put_jsonl(session_factory, storage, pair_lines(12)),
                        hyper=stored_config(method="dpo", max_steps=2, rpo_alpha=1.0), model=parent, base_model=MODEL)
    assert runner.run_job(second, settings, session_factory, storage) == runner.SUCCEEDED
    job = get_job(session_factory, second)
    assert job.fine_tuned_model is not None and job.fine_tuned_model.startswith(f"ft:{MODEL}:")
    assert job.continues == parent
    messages = [e.message for e in events(session_factory, second)]
    assert any(m.startswith("LoRA weights start from the adapter") for m in messages)
    assert any("Reference log-probs computed" in m and "continues from" in m for m in messages)
    assert b"".join(storage.iter_bytes(source.storage_key)) == before  # the source's archive is only read
