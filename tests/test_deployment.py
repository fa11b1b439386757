"""The deployment files: docker-compose.yml is checked by `docker-compose config` (Debian's docker-compose 1.29,
no Docker engine needed); Dockerfile.gpu and .dockerignore are read as text. Nothing is built or started."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile.gpu"
APP_SERVICES = {"migrate", "api", "worker", "beat", "inference", "vllm-front"}
SERVICES = {"postgres", "redis", "minio", "vllm", "prometheus"} | APP_SERVICES
GPU_SERVICES = {"worker", "inference", "vllm"}

needs_compose = pytest.mark.skipif(
    shutil.which("docker-compose") is None, reason="docker-compose is not on PATH (Debian: apt-get install docker-compose)"
)


def compose(*args: str) -> subprocess.CompletedProcess[str]:
    # A clean environment for the interpolation: the checks see the file's defaults, not this shell's values.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QLORA_", "POSTGRES_", "MINIO_"))}
    env.pop("API_PORT", None)
    env.pop("HOST_MODELS_DIR", None)
    return subprocess.run(["docker-compose", "-f", str(COMPOSE_FILE), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def config() -> dict:
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose is not on PATH (Debian: apt-get install docker-compose)")
    result = compose("config")
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


@needs_compose
def test_compose_file_is_valid():
    result = compose("config", "-q")
    assert result.returncode == 0, result.stderr


def test_compose_services(config):
    assert set(config["services"]) == SERVICES
    for name in APP_SERVICES:
        service = config["services"][name]
        assert service["image"] == "qlora-service:gpu"
        assert service["build"]["dockerfile"] == "Dockerfile.gpu"
        assert Path(service["build"]["context"]) == REPO


def test_compose_worker_reserves_one_gpu(config):
    worker = config["services"]["worker"]
    [device] = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["count"] == 1 and device["capabilities"] == ["gpu"]
    command = worker["command"]
    assert command[:4] == ["celery", "-A", "worker.celery_app", "worker"]
    assert command[command.index("-Q") + 1] == "qlora" and command[command.index("--concurrency") + 1] == "1"
    for name in GPU_SERVICES - {"worker"}:
        [device] = config["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["count"] == 1
    for name in SERVICES - GPU_SERVICES:
        assert "deploy" not in config["services"][name], f"only the worker and the inference servers ask for a GPU, not {name}"


def test_compose_commands(config):
    services = config["services"]
    assert services["migrate"]["command"] == ["python", "-m", "core.bootstrap"]
    assert services["migrate"]["restart"] == "no", "a one-shot service"
    assert services["api"]["command"] == ["uvicorn", "--factory", "api.main:create_app", "--host", "0.0.0.0", "--port", "8000"]
    beat = services["beat"]["command"]
    assert beat[:4] == ["celery", "-A", "worker.celery_app", "worker"] and "-B" in beat
    assert beat[beat.index("-Q") + 1] == "qlora-control", "the sweeper serves the control queue, not the GPU workers' queue"
    assert services["minio"]["command"][:2] == ["server", "/data"] and ":9001" in services["minio"]["command"]
    assert [p["target"] for p in services["api"]["ports"]] == [8000]
    for name in ("postgres", "minio", "redis"):
        assert services[name]["healthcheck"]["test"], f"{name} has no healthcheck"
    # Chat completions: the API sends them to the embedded inference server, or to the front of vLLM (profile).
    assert services["api"]["environment"]["QLORA_INFERENCE_URL"] == "http://inference:8001"
    assert services["inference"]["command"][:3] == ["python", "-m", "inference.server"] and "8001" in services["inference"]["command"]
    assert services["vllm-front"]["command"][:3] == ["python", "-m", "inference.vllm_front"]
    assert "--enable-lora" in services["vllm"]["command"]
    assert services["vllm"]["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert "inference" not in services["api"].get("ports", []) and "ports" not in services["inference"]


def test_compose_prometheus_scrapes_the_api_behind_a_profile(config):
    prometheus = config["services"]["prometheus"]
    assert prometheus["image"].startswith("prom/prometheus") and prometheus["profiles"] == ["metrics"]
    [mount] = [v for v in prometheus["volumes"] if v.endswith(":/etc/prometheus/prometheus.yml:ro")]
    source = Path(mount.split(":")[0])
    assert source == REPO / "deploy" / "prometheus.yml"
    scrape = yaml.safe_load(source.read_text())["scrape_configs"]
    assert [(s["metrics_path"], s["static_configs"][0]["targets"]) for s in scrape] == [("/metrics", ["api:9100"])]
    # The API serves its metrics on that port only, not published on the host (the API's port is the only one).
    api = config["services"]["api"]
    assert api["environment"]["QLORA_METRICS_PORT"] == "9100" and api["environment"]["QLORA_METRICS_HOST"] == "0.0.0.0"
    assert [p["target"] for p in api["ports"]] == [8000]
    assert prometheus["ports"] == ["127.0.0.1:9090:9090/tcp"], "the UI on the host's loopback only"


def test_compose_start_order(config):
    services = config["services"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["migrate"]["depends_on"]["minio"]["condition"] == "service_healthy"
    for name in ("api", "worker", "beat"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully", name


def test_compose_environment(config):
    for name in APP_SERVICES:
        env = config["services"][name]["environment"]
        assert env["QLORA_DATABASE_URL"].startswith("postgresql+psycopg://") and "@postgres:5432/" in env["QLORA_DATABASE_URL"]
        assert env["QLORA_BROKER_URL"] == "redis://redis:6379/0"
        assert env["QLORA_S3_ENDPOINT"] == "http://minio:9000" and env["QLORA_S3_BUCKET"]
        assert env["QLORA_HOME"] == "/data" and env["QLORA_MODELS_DIR"] == "/data/models"
        assert env["QLORA_LOG_FORMAT"] == "json", "one JSON object a log line, for a log collector"
        # Empty unless set in the environment: then `migrate` generates the key into the shared /data volume.
        assert env["QLORA_API_KEYS"] == ""
        assert env["AWS_ACCESS_KEY_ID"] == config["services"]["minio"]["environment"]["MINIO_ROOT_USER"]
        assert env["AWS_SECRET_ACCESS_KEY"] == config["services"]["minio"]["environment"]["MINIO_ROOT_PASSWORD"]
        assert any(v.endswith(":/data:rw") or v.endswith(":/data") for v in config["services"][name]["volumes"])
    # Every QLORA_* variable the file sets is one core.settings reads.
    from core.settings import Settings

    known = {f"QLORA_{field.upper()}" for field in Settings.model_fields}
    for name in APP_SERVICES:
        assert set(k for k in config["services"][name]["environment"] if k.startswith("QLORA_")) <= known


def test_compose_models_are_mounted_read_only(config):
    for name in ("api", "worker"):
        volumes = config["services"][name]["volumes"]
        assert any(v.endswith(":/data/models:ro") for v in volumes), f"{name}: {volumes}"


def test_compose_api_keys_come_from_the_environment():
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose is not on PATH (Debian: apt-get install docker-compose)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("QLORA_")}
    result = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE_FILE), "config"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**env, "QLORA_API_KEYS": "sk-a,sk-b=team"},
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["services"]["api"]["environment"]["QLORA_API_KEYS"] == "sk-a,sk-b=team"


# --- Dockerfile.gpu, .dockerignore ----------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        keyword, _, args = full.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    assert not pending, "a continuation line at the end of the file"
    return instructions


def test_dockerfile_builds_the_project_on_a_cuda_base():
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    keywords = [k for k, _ in instructions]
    assert keywords[0] == "FROM", "the first instruction is FROM"
    assert keywords.count("FROM") == 1
    known = {"FROM", "RUN", "COPY", "ADD", "ENV", "ARG", "WORKDIR", "USER", "EXPOSE", "CMD", "ENTRYPOINT", "LABEL", "HEALTHCHECK"}
    assert set(keywords) <= known, set(keywords) - known

    base = instructions[0][1]
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-[a-z-]*runtime-ubuntu\d+\.\d+", base)
    assert match, f"a CUDA runtime base image, not {base}"

    args = dict(a.split("=", 1) for k, a in instructions if k == "ARG" and "=" in a)
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["TORCH_VERSION"]), "torch is pinned"
    cuda_tag = args["TORCH_INDEX_URL"].rsplit("/", 1)[1]
    assert cuda_tag == f"cu{match[1]}{match[2]}", "torch's CUDA build matches the base image's CUDA"

    runs = [a for k, a in instructions if k == "RUN"]
    torch_install = next(i for i, r in enumerate(runs) if "torch==${TORCH_VERSION}" in r and "${TORCH_INDEX_URL}" in r)
    project_install = next(i for i, r in enumerate(runs) if re.search(r"pip install \"?/app\[train\]", r))
    assert torch_install < project_install, "the CUDA torch is installed first, so that `.[train]` keeps it"

    copy_index = keywords.index("COPY")
    assert instructions[copy_index][1] == ". /app"
    assert keywords.index("COPY") < [i for i, k in enumerate(keywords) if k == "RUN"][project_install]
    workdir = [a for k, a in instructions if k == "WORKDIR"]
    assert workdir == ["/app"]
    env = " ".join(a for k, a in instructions if k == "ENV")
    assert "PYTHONPATH=/app" in env, "core.bootstrap finds alembic.ini and migrations/ in the source tree"


def test_dockerignore_keeps_local_state_out_of_the_image():
    patterns = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")}
    assert {".venv", ".cache", ".qlora", ".git"} <= patterns
    # ...and keeps what the image needs: the packages, the migrations, pyproject.
    for needed in ("core", "worker", "migrations", "alembic.ini", "pyproject.toml"):
        assert needed not in patterns and (REPO / needed).exists()


def test_the_multi_gpu_example_in_the_docs_is_valid(tmp_path):
    """docs/operations.md's `worker-gpu1` service, added to a copy of the compose file as the docs say."""
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose is not on PATH (Debian: apt-get install docker-compose)")
    import textwrap

    docs = (REPO / "docs" / "operations.md").read_text()
    [block] = [b for b in re.findall(r"```yaml\n(.*?)```", docs, flags=re.S) if "worker-gpu1:" in b]
    service = textwrap.indent(textwrap.dedent(block), "  ")
    text = COMPOSE_FILE.read_text()
    assert text.index("  worker:\n") < text.index("              count: 1\n") < text.index("  inference:\n")
    text = text.replace("              count: 1\n", '              device_ids: ["0"]\n', 1)  # the worker's, the first
    text = text.replace("\nvolumes:\n", "\n" + service + "\nvolumes:\n")
    (tmp_path / "docker-compose.yml").write_text(text)
    env = {k: v for k, v in os.environ.items() if not k.startswith("QLORA_")}
    result = subprocess.run(["docker-compose", "config"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    devices = {
        name: services[name]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] for name in ("worker", "worker-gpu1")
    }
    assert devices == {"worker": ["0"], "worker-gpu1": ["1"]}
    assert services["worker-gpu1"]["command"] == services["worker"]["command"]
    assert services["worker-gpu1"]["depends_on"] == services["worker"]["depends_on"]


def test_compose_inference_backends_are_on_an_internal_network():
    """Issue 20, defect 6: the inference backends are reachable from the API only: an internal network, nothing
    published, and vLLM started with the shared secret as its --api-key. Read from the file itself (no
    docker-compose needed)."""
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    assert raw["networks"]["inference"] == {"internal": True}
    services = raw["services"]
    for name in ("inference", "vllm", "vllm-front"):
        assert services[name]["networks"] == ["inference"] and "ports" not in services[name], name
    assert set(services["api"]["networks"]) == {"default", "inference"}
    assert raw["x-qlora-environment"]["QLORA_INFERENCE_SECRET"] == "${QLORA_INFERENCE_SECRET:-}"
    script = services["vllm"]["entrypoint"][2]
    assert '--api-key "$${QLORA_INFERENCE_SECRET:-$$(cat /qlora/inference_secret)}"' in script
    assert "qlora-home:/qlora:ro" in services["vllm"]["volumes"]
    assert services["vllm"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
