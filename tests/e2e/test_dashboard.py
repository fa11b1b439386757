"""The dashboard at /ui in a real headless Chromium (Debian's `chromium`, driven by Playwright) against the embedded
service: sign in, upload a faulty file and read its line numbers, create a job on the demo model with the
schema-driven form and watch its loss curve gain points without a reload, cancel another job, download the adapter,
chat with the result, and see that a second project's key shows none of it. Also the keyboard path to signing in
and the layout at phone width."""

from __future__ import annotations

import io
import re
import shutil
import tarfile
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import DEMO
from tests.e2e.test_openai_sdk import KEY_A, KEY_B, chat_lines

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TERMINAL = ("succeeded", "failed", "cancelled")
# Checked here, not in a fixture: pytest sets the session's service up before a module fixture could skip.
pytestmark = [pytest.mark.slow, pytest.mark.skipif(CHROMIUM is None, reason="no chromium executable on PATH "
                                                   "(Debian: apt-get install --no-install-recommends chromium)")]
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the dev extra)")
expect = sync_api.expect
# The shortest job that still shows a curve, validation points and checkpoints: plain LoRA in fp32 (on the CPU,
# 4-bit quantization and bf16 make loading and each step many times slower), one short example a step.
SHORT_JOB = {"max_steps": "3", "max_seq_length": "64", "eval_every": "2", "eval_batch_size": "4", "checkpoint_every": "2", "lora_r": "4",
             "learning_rate": "0.001", "quantization": "none", "compute_dtype": "fp32", "gradient_checkpointing": "off"}


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, embedded_service):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, base_url=f"http://127.0.0.1:{embedded_service.port}")
    page = context.new_page()
    page.set_default_timeout(20_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def sign_in(page, key: str) -> None:
    page.goto("/ui/#/signin")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Fine-tuning jobs")).to_be_visible()


def upload(page, name: str, content: bytes) -> None:
    page.get_by_label("JSONL file").set_input_files({"name": name, "mimeType": "application/jsonl", "buffer": content})
    page.get_by_role("button", name="Upload and validate").click()


def fill_job_form(page, hyperparameters: dict[str, str], validation: bool) -> None:
    """Fill the create-job form, whose fields come from the OpenAPI document."""
    page.get_by_role("link", name="New job").click()
    page.get_by_label("Base model").select_option(DEMO)
    page.get_by_label("Training file").select_option(label=page.locator("#job-training-file option", has_text="train.jsonl").first.inner_text())
    if validation:
        page.get_by_label("Validation file").select_option(label=page.locator("#job-validation-file option", has_text="valid.jsonl").first.inner_text())
    page.get_by_label("batch_size", exact=True).fill("1")
    if not page.locator("#engine-options").evaluate("el => el.open"):
        page.locator("#engine-options summary").click()
    for name, value in hyperparameters.items():
        field = page.get_by_label(name, exact=True)
        if field.evaluate("el => el.tagName") == "SELECT":
            field.select_option(value)
        else:
            field.fill(value)


def create_job(page, hyperparameters: dict[str, str], validation: bool) -> str:
    """Create a job with the form and return its id (the page is then the job's)."""
    fill_job_form(page, hyperparameters, validation)
    page.get_by_role("button", name="Create job").click()
    expect(page).to_have_url(re.compile(r"#/jobs/ftjob-"))
    return page.url.rsplit("/", 1)[-1]


def points(page) -> int:
    return int(page.locator("[data-chart=loss]").get_attribute("data-points"))


def job_status(page) -> str:
    return page.locator("#job-status").inner_text().strip()


def pause_and_resume(page, embedded_service, job_id: str) -> None:
    """On the page of a queued job: pause it, resume it, then a pause the API refuses (the job was paused behind the
    page's back, just before the page's own request) shows the envelope, and the page catches up to `paused`."""
    import httpx

    status = page.locator("#job-status")
    expect(status).to_have_text(re.compile(r"queued|running"))
    page.get_by_role("button", name="Pause job").click()
    expect(status).to_have_text("paused")  # a queued job leaves the queue at once
    expect(page.get_by_role("button", name="Pause job")).to_have_count(0)
    page.get_by_role("button", name="Resume job").click()
    expect(status).to_have_text(re.compile(r"queued|running"))
    expect(page.get_by_role("button", name="Resume job")).to_have_count(0)
    expect(page.locator("#events")).to_contain_text("Job resumed")

    def pause_first(route) -> None:
        with httpx.Client(base_url=embedded_service.base_url, headers={"Authorization": f"Bearer {KEY_A}"}, timeout=30) as api:
            assert api.post(f"/fine_tuning/jobs/{job_id}/pause").json()["status"] == "paused"
        route.continue_()

    page.route(f"**/v1/fine_tuning/jobs/{job_id}/pause", pause_first)
    page.get_by_role("button", name="Pause job").click()
    alert = page.locator("#action-errors [role=alert]")
    expect(alert).to_contain_text(f"Job {job_id} is paused and cannot be paused.")
    expect(alert).to_contain_text("invalid_job_status")
    page.unroute(f"**/v1/fine_tuning/jobs/{job_id}/pause")
    expect(status).to_have_text("paused")  # the next poll shows the job as it is; the error stays until the next action
    expect(page.get_by_role("button", name="Resume job")).to_be_visible()
    expect(alert).to_be_visible()


def test_keyboard_reaches_sign_in_and_enter_submits(page):
    page.goto("/ui/")
    expect(page.get_by_label("API key")).to_be_visible()
    focused = []
    for _ in range(10):  # the skip link and the brand come first
        page.keyboard.press("Tab")
        focused.append(page.evaluate("document.activeElement.id"))
        if focused[-1] == "api-key":
            break
    assert focused[-1] == "api-key", focused
    page.keyboard.type("not-a-key")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "sign-in"
    page.keyboard.press("Shift+Tab")
    page.keyboard.press("Enter")  # Enter in the field submits the form: the wrong key is answered with the envelope
    alert = page.get_by_role("alert")
    expect(alert).to_contain_text("Incorrect API key provided.")
    expect(alert).to_contain_text("invalid_api_key")
    page.get_by_label("API key").fill(KEY_A)
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", name="Fine-tuning jobs")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('qlora.apiKey')") == KEY_A
    assert page.evaluate("localStorage.length") == 0  # the key is kept in the tab's session only


def test_dashboard_scenario(page, embedded_service, tmp_path):
    sign_in(page, KEY_A)

    # Upload: a file with faults on lines 12 and 13 shows them; the two example files pass.
    page.get_by_role("link", name="Upload").click()
    upload(page, "bad.jsonl", chat_lines(11) + b'{"messages": [{"role": "robot", "content": "x"}]}\nnot json\n')
    faults = page.locator("#fault-list li")
    expect(faults).to_have_count(2)
    assert [faults.nth(i).get_attribute("data-line") for i in range(2)] == ["12", "13"]
    expect(faults.nth(0)).to_contain_text("robot")
    upload(page, "train.jsonl", chat_lines(12))
    expect(page.locator("#upload-result .ok")).to_contain_text("train.jsonl is valid")
    upload(page, "valid.jsonl", chat_lines(2, "v"))
    expect(page.locator("#upload-result .ok")).to_contain_text("valid.jsonl is valid")

    # A bad option in the form is answered with the API's envelope, naming its param, and marks the field.
    fill_job_form(page, {"lora_r": "0"}, validation=False)
    page.get_by_role("button", name="Create job").click()
    expect(page.locator("#create-errors [role=alert]")).to_contain_text("method.supervised.hyperparameters.lora_r")
    expect(page.get_by_label("lora_r", exact=True)).to_have_attribute("aria-invalid", "true")

    # Two jobs: a short one on the demo model, and another that waits behind it (one worker): it is paused,
    # resumed, and then cancelled while paused.
    job_id = create_job(page, SHORT_JOB, validation=True)
    other_id = create_job(page, {"max_steps": "50", "max_seq_length": "32"}, validation=False)
    pause_and_resume(page, embedded_service, other_id)
    page.get_by_role("button", name="Cancel job").click()
    page.get_by_role("button", name="Yes, cancel it").click()
    expect(page.locator("#job-status")).to_have_text("cancelled")
    expect(page.get_by_role("button", name="Cancel job")).to_have_count(0)

    # The jobs list: newest first, and the status filter.
    page.get_by_role("link", name="Jobs").click()
    # (The service is shared: the project may hold other tests' jobs, older than these two.)
    rows = page.locator("#jobs-table tbody tr")
    expect(rows.first).to_have_attribute("data-job", other_id)
    expect(rows.nth(1)).to_have_attribute("data-job", job_id)
    assert "paused" in page.locator("#status-filter option").all_inner_texts()
    page.get_by_label("Status").select_option("cancelled")
    expect(page.locator(f'#jobs-table tbody tr[data-job="{job_id}"]')).to_have_count(0)  # the filter is applied
    expect(rows.first).to_have_attribute("data-job", other_id)
    assert set(rows.locator("td:nth-child(2)").all_inner_texts()) == {"cancelled"}
    page.get_by_label("Status").select_option("")
    expect(rows.nth(1)).to_have_attribute("data-job", job_id)
    page.get_by_role("link", name=job_id).click()

    # The loss curve gains points while the job trains, with no reload (a marker on `window` survives).
    page.evaluate("window.__sameDocument = true")
    seen: list[tuple[int, str]] = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        state = (points(page), job_status(page))
        if not seen or seen[-1] != state:
            seen.append(state)
        if state[1] in TERMINAL:
            break
        time.sleep(0.2)
    print(f"\n(loss points, status) as the page showed them: {seen}")
    assert job_status(page) == "succeeded", (seen, embedded_service.dump_logs())
    final = points(page)
    assert final == 3
    assert any(0 < n < final and status == "running" for n, status in seen), f"no partial curve seen while running: {seen}"
    assert page.evaluate("window.__sameDocument === true")
    train_loss, valid_loss = (float(x) for x in page.locator("#stat-loss .stat-value").inner_text().split(" / "))
    assert train_loss > 0 and valid_loss > 0
    assert page.locator("[data-chart=loss]").get_attribute("aria-label").startswith("Loss: 3 points")
    expect(page.locator("#stat-step")).to_contain_text("3 of 3")
    expect(page.locator("#stat-memory")).to_contain_text("MiB")
    assert "%" in page.locator("#stat-accuracy").inner_text()
    expect(page.locator("#checkpoints tbody tr")).to_have_count(2)  # checkpoint_every=2: steps 3 (the end) and 2
    expect(page.locator("#checkpoints tbody tr").first).to_contain_text("ckpt-step-3")

    # Download the adapter: fetched with the key and handed over as a blob; a real peft archive.
    with page.expect_download() as info:
        page.locator("#result-files button[data-file$='.tar.gz']").click()
    archive = Path(info.value.path()).read_bytes()
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        names = tar.getnames()
    assert any(n.endswith("adapter_config.json") for n in names) and any(n.endswith("adapter_model.safetensors") for n in names), names

    shots = tmp_path / "screenshots"
    shots.mkdir()
    page.screenshot(path=shots / "job-1280.png", full_page=True)
    # Phone width: the job page has no horizontal scroll (tables and charts fit or scroll inside themselves).
    page.set_viewport_size({"width": 375, "height": 800})
    # The page's CSP (no 'unsafe-eval') refuses wait_for_function's string predicate: wait by polling the layout.
    chart = page.locator("[data-chart=loss] canvas")
    deadline = time.monotonic() + 10
    while chart.bounding_box()["width"] > 375 and time.monotonic() < deadline:
        page.wait_for_timeout(100)
    assert page.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth"), \
        page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    page.screenshot(path=shots / "job-375.png", full_page=True)
    print(f"\nscreenshots of the job page: {shots / 'job-1280.png'} and {shots / 'job-375.png'}")
    page.set_viewport_size({"width": 1280, "height": 900})

    # Chat with the fine-tuned model from its job page.
    page.get_by_role("link", name="Try in chat").click()
    page.get_by_label("Max tokens").fill("4")
    page.get_by_label("Message").fill("What's the Zephyr project's launch code?")
    page.get_by_role("button", name="Send").click()
    expect(page.locator("#chat-transcript .msg-assistant")).to_have_count(1, timeout=120_000)

    # A second project's key sees none of it: an empty list, and the job's page answers 404 job_not_found.
    page.get_by_role("button", name="Sign out").click()
    assert page.evaluate("sessionStorage.getItem('qlora.apiKey')") is None
    sign_in(page, KEY_B)
    expect(page.locator("#jobs-table, #no-jobs")).to_be_visible()
    for hidden in (job_id, other_id):
        expect(page.locator(f'[data-job="{hidden}"]')).to_have_count(0)
    page.goto(f"/ui/#/jobs/{job_id}")
    alert = page.locator("#job-errors [role=alert]")
    expect(alert).to_contain_text("job_not_found")
    expect(alert).to_contain_text("job_id")


def test_jobs_list_pages(page, embedded_service):
    """Pages of 20 with the API's `after`: Next shows the rest, Previous the first page again."""
    import httpx

    with httpx.Client(base_url=embedded_service.base_url, headers={"Authorization": f"Bearer {KEY_B}"}, timeout=30) as api:
        training_file = api.post("/files", data={"purpose": "fine-tune"}, files={"file": ("train.jsonl", chat_lines(12))}).json()["id"]
        created = []
        for _ in range(21):  # each cancelled at once, so the worker trains none of them
            job = api.post("/fine_tuning/jobs", json={"model": DEMO, "training_file": training_file, "hyperparameters": {"max_steps": 1}})
            assert job.status_code == 200, job.text
            created.append(job.json()["id"])
            assert api.post(f"/fine_tuning/jobs/{created[-1]}/cancel").status_code == 200
    sign_in(page, KEY_B)
    assert "paused" in page.locator("#status-filter option").all_inner_texts()
    page.get_by_label("Status").select_option("cancelled")
    rows = page.locator("#jobs-table tbody tr")
    expect(rows).to_have_count(20)
    assert rows.first.get_attribute("data-job") == created[-1]
    page.get_by_role("link", name="Next page").click()
    expect(rows).to_have_count(1)  # 21 = 20 + 1 (no other test makes cancelled jobs for this key)
    expect(rows.first).to_have_attribute("data-job", created[0])
    page.get_by_role("link", name="Previous page").click()
    expect(page.get_by_role("link", name="Previous page")).to_have_count(0)
    expect(rows.first).to_have_attribute("data-job", created[-1])
    expect(rows).to_have_count(20)



# make test-bench: a dpo job trained in the browser test takes over a minute of make test's 15.
@pytest.mark.bench
def test_a_dpo_job_from_the_form_shows_reward_curves(page, embedded_service):
    """Method dpo in the create form: its options appear only for dpo, a beta out of range is the API's envelope
    on that field, and the job's page shows reward accuracy and margin curves in place of token accuracy."""
    import json

    import httpx

    def pairs(n: int, tag: str) -> bytes:
        return b"".join(json.dumps({"input": {"messages": [{"role": "user", "content": f"{tag} {i}?"}]},
                                    "preferred_output": [{"role": "assistant", "content": f"Sure: {i}."}],
                                    "non_preferred_output": [{"role": "assistant", "content": f"{i}"}]}).encode() + b"\n"
                        for i in range(n))

    with httpx.Client(base_url=embedded_service.base_url, headers={"Authorization": f"Bearer {KEY_B}"}, timeout=30) as api:
        for name, content in (("train-pairs.jsonl", pairs(12, "q")), ("valid-pairs.jsonl", pairs(2, "v"))):
            uploaded = api.post("/files", data={"purpose": "fine-tune"}, files={"file": (name, content)})
            assert uploaded.status_code == 200 and uploaded.json()["status"] == "processed", uploaded.text
    sign_in(page, KEY_B)
    page.goto("/ui/#/new?method=dpo")  # a link may preselect the method
    expect(page.locator("#job-method")).to_have_value("dpo")
    expect(page.locator("#dpo-options")).to_be_visible()
    page.locator("#job-method").select_option("supervised")
    expect(page.locator("#dpo-options")).to_be_hidden()
    page.locator("#job-method").select_option("dpo")
    expect(page.locator("#dpo-options")).to_be_visible()
    page.get_by_label("Base model").select_option(DEMO)
    page.get_by_label("Training file").select_option(label=page.locator("#job-training-file option", has_text="train-pairs.jsonl").first.inner_text())
    page.get_by_label("Validation file").select_option(label=page.locator("#job-validation-file option", has_text="valid-pairs.jsonl").first.inner_text())
    page.get_by_label("batch_size", exact=True).fill("2")
    page.get_by_label("beta", exact=True).fill("3")
    page.locator("#engine-options summary").click()
    for name, value in {**SHORT_JOB, "max_steps": "2", "max_seq_length": "96", "eval_every": "1"}.items():
        field = page.get_by_label(name, exact=True)
        if field.evaluate("el => el.tagName") == "SELECT":
            field.select_option(value)
        else:
            field.fill(value)
    page.get_by_role("button", name="Create job").click()
    expect(page.locator("#create-errors [role=alert]")).to_contain_text("method.dpo.hyperparameters.beta")
    expect(page.get_by_label("beta", exact=True)).to_have_attribute("aria-invalid", "true")
    page.get_by_label("beta", exact=True).fill("0.2")
    page.get_by_label("rpo_alpha", exact=True).fill("1")
    page.get_by_role("button", name="Create job").click()
    expect(page).to_have_url(re.compile(r"#/jobs/ftjob-"))

    expect(page.locator("#job-status")).to_have_text("succeeded", timeout=600_000)  # the reference pass and an evaluation a step
    expect(page.locator("[data-chart=reward-accuracy]")).to_have_attribute("data-points", "2")
    expect(page.locator("[data-chart=reward-margin]")).to_have_attribute("data-points", "2")
    expect(page.locator("[data-chart=accuracy]")).to_be_hidden()
    assert page.locator("[data-chart=reward-accuracy]").get_attribute("aria-label").startswith("Reward accuracy: 2 points")
    expect(page.locator("#stat-reward-accuracy")).to_contain_text("%")
    assert len(page.locator("#stat-reward-margin .stat-value").inner_text().split(" / ")) == 2
    expect(page.locator("#stat-accuracy")).to_have_count(0)


def test_webhooks_page(page, embedded_service):
    """Create an endpoint (its secret shown once) for a receiver on 127.0.0.1, which the embedded mode's URL policy
    admits; a job cancelled over the API shows as a delivered event in the endpoint's delivery log; delete it."""
    import httpx

    from tests.webhook_receiver import Receiver

    receiver = Receiver().up()
    try:
        sign_in(page, KEY_A)
        page.get_by_role("link", name="Webhooks").click()
        page.get_by_label("Endpoint URL").fill("http://169.254.169.254/latest/meta-data/")
        page.get_by_role("button", name="Create endpoint").click()
        expect(page.locator("#webhook-form [role=alert]")).to_contain_text("link-local")  # the URL policy's 400, param url
        page.get_by_label("Endpoint URL").fill(receiver.url)
        page.get_by_label("Name (optional)").fill("dashboard-hook")
        page.get_by_label("fine_tuning.job.succeeded").uncheck()
        page.get_by_role("button", name="Create endpoint").click()
        secret = page.locator("#webhook-secret")
        expect(secret).to_contain_text("whsec_")
        signing_secret = secret.inner_text()
        expect(page.locator("#webhooks-table tbody tr", has_text="dashboard-hook")).to_contain_text("failed, cancelled")

        with httpx.Client(base_url=embedded_service.base_url, headers={"Authorization": f"Bearer {KEY_A}"}, timeout=30) as api:
            training_file = api.post("/files", data={"purpose": "fine-tune"}, files={"file": ("train.jsonl", chat_lines(12))}).json()["id"]
            job = api.post("/fine_tuning/jobs", json={"model": DEMO, "training_file": training_file, "hyperparameters": {"max_steps": 1}}).json()
            assert api.post(f"/fine_tuning/jobs/{job['id']}/cancel").status_code == 200
        page.get_by_role("link", name="dashboard-hook").click()
        row = page.locator("#deliveries-table tbody tr")
        expect(row).to_contain_text("delivered", timeout=60_000)  # the page refreshes itself
        expect(row).to_contain_text(job["id"])
        expect(row).to_contain_text("HTTP 200")
        [request] = receiver.ok()
        from openai import OpenAI

        event = OpenAI(base_url=embedded_service.base_url, api_key=KEY_A).webhooks.unwrap(request.body, request.headers, secret=signing_secret)
        assert (event.type, event.data.id) == ("fine_tuning.job.cancelled", job["id"])

        page.get_by_role("link", name="All webhook endpoints").click()
        page.on("dialog", lambda dialog: dialog.accept())
        page.get_by_role("button", name="Delete dashboard-hook").click()
        expect(page.locator("#webhooks-table tbody tr", has_text="dashboard-hook")).to_have_count(0)
    finally:
        receiver.down()
