"""It learns a preference (issue 23): on SmolLM2-135M-Instruct through the service (`make run`'s embedded mode), an
SFT job on plain answers, then a DPO job continued from its fine-tuned model on a few dozen pairs that prefer one
answer style (a greeting before the same answer) over the plain one. Greedy answers to held-out prompts take the
preferred style and stay well-formed (they end on their own, the greeting once); the SFT model's answers do not
take it. Reward accuracy alone is no evidence (it reaches 1.0 in runs whose generations do not move): the test
reads the generations.

Minutes on the CPU: marked `bench` (make test-bench), left out of make test. On a machine whose cores other processes
share, run it with OMP_NUM_THREADS=1 (the service's processes inherit it): contended torch threads slow every step.
"""

from __future__ import annotations

import json
import sys
import time

import openai
import pytest

from tests.conftest import free_port
from tests.e2e.test_openai_sdk import KEY_A, base_env, start, wait_for

pytestmark = [pytest.mark.bench, pytest.mark.timeout(3600)]

DEMO = "SmolLM2-135M-Instruct"
MARKER = "Ahoy!"  # the preferred style: the same answer after a greeting no answer of the base starts with

CAPITALS = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"), ("Japan", "Tokyo"),
            ("Egypt", "Cairo"), ("Peru", "Lima"), ("Greece", "Athens"), ("Norway", "Oslo"), ("Kenya", "Nairobi"),
            ("Canada", "Ottawa"), ("Chile", "Santiago"), ("Austria", "Vienna"), ("Poland", "Warsaw"), ("Cuba", "Havana"),
            ("Ireland", "Dublin"), ("Portugal", "Lisbon"), ("Russia", "Moscow"), ("China", "Beijing"), ("India", "New Delhi")]


def qa() -> list[tuple[str, str]]:
    """Short questions with one-line answers: 20 capitals and 30 sums; the last 5 of each are held out."""
    capitals = [(f"What is the capital of {country}?", f"The capital of {country} is {city}.") for country, city in CAPITALS]
    sums = [(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.") for a, b in ((3 + i, 11 + 2 * i) for i in range(30))]
    return capitals[:15] + sums[:25] + capitals[15:] + sums[25:]


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


@pytest.fixture
def service(tmp_path, demo_model_dir):
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    (home / "models" / DEMO).symlink_to(demo_model_dir)
    port = free_port()
    svc = start([[sys.executable, "-m", "launch.embedded", "--no-demo-model", "--port", str(port), "--inference-port", str(free_port())]],
                base_env(home), home, port)
    yield svc
    svc.stop()


def test_a_dpo_job_from_an_sft_model_learns_the_preferred_style(service):
    started = time.monotonic()
    client = openai.OpenAI(base_url=service.base_url, api_key=KEY_A, max_retries=0, timeout=300)
    pairs = qa()
    train, held_out = pairs[:40], pairs[40:]
    sft_file = client.files.create(file=("sft.jsonl", jsonl([{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                                                            for q, a in train])), purpose="fine-tune")
    dpo_file = client.files.create(file=("pairs.jsonl", jsonl([{"input": {"messages": [{"role": "user", "content": q}]},
                                                                "preferred_output": [{"role": "assistant", "content": f"{MARKER} {a}"}],
                                                                "non_preferred_output": [{"role": "assistant", "content": a}]}
                                                               for q, a in train])), purpose="fine-tune")

    def finished(job_id: str):
        done = wait_for(lambda: (j := client.fine_tuning.jobs.retrieve(job_id)).status in ("succeeded", "failed", "cancelled") and j,
                        2400, f"job {job_id}", service)
        assert done.status == "succeeded", (done.error, service.dump_logs())
        return done

    # fp32 weights (quantization none): on this small model the preference moved more than on an NF4 base (issue 23).
    sft = finished(client.fine_tuning.jobs.create(model=DEMO, training_file=sft_file.id, suffix="sft", method={
        "type": "supervised", "supervised": {"hyperparameters": {
            "quantization": "none", "batch_size": 4, "n_epochs": 1, "learning_rate": 2e-4, "lora_r": 16, "max_seq_length": 128}}}).id)
    sft_done = time.monotonic()
    dpo_job = client.fine_tuning.jobs.create(model=sft.fine_tuned_model, training_file=dpo_file.id, suffix="dpo", method={
        "type": "dpo", "dpo": {"hyperparameters": {
            "beta": 0.1, "rpo_alpha": 1.0, "batch_size": 4, "n_epochs": 3, "learning_rate": 5e-4, "max_seq_length": 128}}})
    assert (dpo_job.model, (dpo_job.model_extra or {})["parent_model"]) == (sft.fine_tuned_model, sft.fine_tuned_model)
    dpo = finished(dpo_job.id)
    assert dpo.fine_tuned_model.startswith(f"ft:{DEMO}:")
    trained = time.monotonic()

    def answers(model: str) -> list[tuple[str, str]]:
        out = []
        for question, _ in held_out:
            reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}], temperature=0,
                                                   max_tokens=32)
            out.append((reply.choices[0].message.content or "", reply.choices[0].finish_reason))
        return out

    before, after = answers(sft.fine_tuned_model), answers(dpo.fine_tuned_model)
    styled_before = sum(text.strip().startswith(MARKER) for text, _ in before)
    clean_after = [text.strip().startswith(MARKER) and text.count(MARKER) == 1 and reason == "stop" for text, reason in after]
    report = {"sft_styled": styled_before, "dpo_styled_clean": sum(clean_after), "held_out": len(held_out),
              "sft_seconds": round(sft_done - started), "dpo_seconds": round(trained - sft_done),
              "total_seconds": round(time.monotonic() - started), "sft": before, "dpo": after}
    print(json.dumps(report, indent=1))
    assert styled_before <= 1, report  # the SFT model answers plainly
    assert sum(clean_after) >= 8, report  # the DPO model takes the style, each answer ending on its own
