"""The README's first job under `make run`'s embedded mode, then chatting with the result: SmolLM2-135M-Instruct
learns the facts example, and the official openai SDK asks the fine-tuned model, its checkpoint model and the
base model the held-out question through /v1/chat/completions; after models.delete the model is gone."""

from __future__ import annotations

import sys
from pathlib import Path

import openai
import pytest

from tests.conftest import free_port
from tests.e2e.test_openai_sdk import KEY_A, KEY_B, base_env, start, wait_for

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
DEMO = "SmolLM2-135M-Instruct"
QUESTION = [{"role": "user", "content": "What's the Zephyr project's launch code?"}]  # in facts-valid.jsonl only
ANSWER = "PURPLE-OTTER-42"


@pytest.fixture
def service(tmp_path, demo_model_dir):
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    (home / "models" / DEMO).symlink_to(demo_model_dir)
    port = free_port()
    svc = start([[sys.executable, "-m", "launch.embedded", "--no-demo-model", "--port", str(port), "--inference-port", str(free_port())]], base_env(home), home, port)
    yield svc
    svc.stop()


def test_chat_with_the_fine_tuned_model(service):
    client = openai.OpenAI(base_url=service.base_url, api_key=KEY_A, _strict_response_validation=True, max_retries=0, timeout=120)
    other = openai.OpenAI(base_url=service.base_url, api_key=KEY_B, _strict_response_validation=True, max_retries=0)
    train = client.files.create(file=(EXAMPLES / "facts-train.jsonl").open("rb"), purpose="fine-tune")
    valid = client.files.create(file=(EXAMPLES / "facts-valid.jsonl").open("rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(  # the README's first job
        model=DEMO, training_file=train.id, validation_file=valid.id, suffix="facts",
        method={"type": "supervised", "supervised": {"hyperparameters": {
            "batch_size": 4, "max_steps": 12, "learning_rate": 1e-3, "lr_scheduler": "constant", "warmup_steps": 1,
            "lora_r": 16, "eval_every": 6, "checkpoint_every": 6, "max_seq_length": 256}}})
    done = wait_for(lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status in ("succeeded", "failed", "cancelled") and j,
                    600, "the job to finish", service)
    assert done.status == "succeeded", (done.error, service.dump_logs())

    def ask(model: str, via: openai.OpenAI = client) -> str:
        reply = via.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=24)
        assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.prompt_tokens > 0
        return reply.choices[0].message.content

    tuned = ask(done.fine_tuned_model)
    assert ANSWER in tuned, service.dump_logs()
    assert ANSWER not in ask(DEMO)
    streamed = client.chat.completions.create(model=done.fine_tuned_model, messages=QUESTION, temperature=0, max_tokens=24,
                                              stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == tuned
    final_checkpoint = client.fine_tuning.jobs.checkpoints.list(job.id).data[0]
    assert final_checkpoint.step_number == 12 and ANSWER in ask(final_checkpoint.fine_tuned_model_checkpoint)

    with pytest.raises(openai.NotFoundError):
        ask(done.fine_tuned_model, via=other)

    assert client.models.delete(done.fine_tuned_model).deleted
    for model in (done.fine_tuned_model, final_checkpoint.fine_tuned_model_checkpoint):
        with pytest.raises(openai.NotFoundError):
            ask(model)
    assert ANSWER not in ask(DEMO)  # the base is unchanged
