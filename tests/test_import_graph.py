"""The import rules between our packages (docs/architecture.md), checked by parsing every import statement of
the source, lazy and TYPE_CHECKING ones included:

- `api/` imports nothing from `worker`; `core/` neither, but for the engine's settings (`worker/training/tunables.py`,
  which imports nothing: the memory estimate they pass it to models them);
- `contract/` imports nothing of ours but itself, and no torch, database, web or queue library;
- the engine, `worker/training/`, imports only itself and `contract` of ours, and no web, database, queue or
  object-storage library, so it runs and tests alone;
- the `qlora` command line, `cli/`, imports only itself of ours and the job-file reader (`contract/job_file.py`,
  shared with the engine's command line, importing nothing of ours), and no torch or service library: a client of
  the public API that installs on a laptop without either.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OURS = ("api", "core", "worker", "contract", "inference", "launch", "migrations", "bench", "tests", "cli")
SERVICE_LIBRARIES = ("fastapi", "starlette", "uvicorn", "sqlalchemy", "alembic", "psycopg", "celery", "kombu", "redis", "boto3",
                     "botocore", "prometheus_client")
TORCH_LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "triton")

# Files allowed an import their package's rule forbids, with the reason. None today: the launcher that imports the
# engine's demo model lives in launch/, outside core/.
EXCEPTIONS: dict[str, set[str]] = {}


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports, as a dotted name (relative imports resolved)."""
    package = path.relative_to(REPO).with_suffix("").parts[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            module = ".".join(part for part in (base, node.module or "") if part)
            found.add(module)
    return found


def sources(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def under(module: str, roots: tuple[str, ...]) -> bool:
    return any(module == root or module.startswith(root + ".") for root in roots)


def violations(package: str, forbidden) -> list[str]:  # noqa: ANN001
    found = []
    for path in sources(package):
        rel = path.relative_to(REPO).as_posix()
        allowed = EXCEPTIONS.get(rel, set())
        found += [f"{rel} imports {module}" for module in sorted(imports_of(path)) if forbidden(module) and module not in allowed]
    return found


# The engine's own settings, which the memory estimate models: torch-free and importing nothing, so the API and
# core may pass them to contract.memory.
ENGINE_SETTINGS = "worker.training.tunables"
# The job-file reader both command lines share.
JOB_FILE_READER = "contract.job_file"


@pytest.mark.parametrize("package", ["api", "core"])
def test_api_and_core_import_nothing_from_the_worker(package):
    assert violations(package, lambda m: under(m, ("worker", "inference", "launch")) and m != ENGINE_SETTINGS) == []


def test_the_engine_settings_import_nothing():
    assert imports_of(REPO / "worker" / "training" / "tunables.py") == set()


def test_api_and_core_import_no_torch():
    for package in ("api", "core"):
        assert violations(package, lambda m: under(m, TORCH_LIBRARIES)) == []


def test_the_contract_imports_only_itself_and_plain_libraries():
    ours_but_contract = tuple(p for p in OURS if p != "contract")
    assert violations("contract", lambda m: under(m, ours_but_contract + SERVICE_LIBRARIES + TORCH_LIBRARIES)) == []


def test_the_engine_imports_no_web_database_queue_or_storage_code():
    assert violations("worker/training", lambda m: under(m, SERVICE_LIBRARIES) or (
        under(m, OURS) and not under(m, ("worker.training", "contract")))) == []


def test_the_command_line_is_a_plain_client():
    assert violations("cli", lambda m: under(m, SERVICE_LIBRARIES + TORCH_LIBRARIES) or (
        under(m, OURS) and not under(m, ("cli", JOB_FILE_READER)))) == []


def test_the_job_file_reader_imports_nothing_of_ours():
    assert [m for m in imports_of(REPO / "contract" / "job_file.py") if under(m, OURS + ("pydantic",))] == []


def test_the_checker_sees_lazy_imports():
    assert "worker.training.demo_model" in imports_of(REPO / "launch" / "embedded.py")  # inside main()
    assert "contract.options" in imports_of(REPO / "worker" / "training" / "model.py")
    assert "cli.watch" in imports_of(REPO / "cli" / "main.py")  # inside cmd_jobs_watch
