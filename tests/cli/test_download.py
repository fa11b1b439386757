"""`qlora download` against a hostile server: a real HTTP server on 127.0.0.1 that answers the job, file and
checkpoint routes with absolute or `..` ids, `.`/`..`/path file names, archives that are not archives or whose
members climb out. Each run (the real CLI, a subprocess) must end with exit status 1 and one line on stderr, and
leave no file anywhere: not outside the output directory, not in it."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
JOB = "ftjob-hostile"
FILE = "file-abc123"
CHECKPOINT = "ftckpt_abc123"


def tar_gz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


GOOD_ARCHIVE = tar_gz({"adapter_config.json": b"{}", "adapter_model.safetensors": b"weights"})


class Hostile:
    """What the server answers: the job's result file ids, each file's name and content, the checkpoint's id and
    archive."""

    def __init__(self, result_files=(FILE,), filename="adapter.tar.gz", content=GOOD_ARCHIVE, checkpoint_id=CHECKPOINT,
                 checkpoint_content=GOOD_ARCHIVE):
        self.result_files, self.filename, self.content = list(result_files), filename, content
        self.checkpoint_id, self.checkpoint_content = checkpoint_id, checkpoint_content
        self.requested: list[str] = []


@pytest.fixture
def server():
    """An HTTP server on a free loopback port; the test sets `server.hostile` to what it answers."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            hostile: Hostile = httpd.hostile
            path = self.path.split("?")[0]
            hostile.requested.append(path)
            if path == f"/v1/fine_tuning/jobs/{JOB}":
                body = {"id": JOB, "object": "fine_tuning.job", "status": "succeeded", "model": "m", "created_at": 0,
                        "result_files": hostile.result_files}
                return self.send(json.dumps(body).encode(), "application/json")
            if path == f"/v1/fine_tuning/jobs/{JOB}/checkpoints":
                body = {"object": "list", "has_more": False, "data": [
                    {"id": hostile.checkpoint_id, "object": "fine_tuning.job.checkpoint", "step_number": 2, "metrics": {},
                     "fine_tuning_job_id": JOB, "created_at": 0, "fine_tuned_model_checkpoint": "m:ckpt-step-2"}]}
                return self.send(json.dumps(body).encode(), "application/json")
            if path.startswith(f"/v1/fine_tuning/jobs/{JOB}/checkpoints/") and path.endswith("/content"):
                return self.send(hostile.checkpoint_content, "application/gzip")
            if path.startswith("/v1/files/") and path.endswith("/content"):
                return self.send(hostile.content, "application/octet-stream")
            if path.startswith("/v1/files/"):
                body = {"id": path.rsplit("/", 1)[1], "object": "file", "bytes": len(hostile.content), "created_at": 0,
                        "filename": hostile.filename, "purpose": "fine-tune-results", "status": "processed"}
                return self.send(json.dumps(body).encode(), "application/json")
            self.send_error(404)

        def send(self, body: bytes, content_type: str):
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.hostile = Hostile()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def download(server, root: Path, *args: str, monkeypatch=None) -> subprocess.CompletedProcess:
    """`qlora download JOB -o root/work/out ARGS` from root/work against the server, temp files under root/tmp: a
    real subprocess, or (given `monkeypatch`) `cli.main.main` in this process, which is much quicker to start and
    lets any exception through."""
    work, tmp = root / "work", root / "tmp"
    work.mkdir(exist_ok=True)
    tmp.mkdir(exist_ok=True)
    env = {"QLORA_BASE_URL": f"http://127.0.0.1:{server.server_port}/v1", "QLORA_API_KEY": "sk-test", "TMPDIR": str(tmp)}
    argv = ["--retries", "0", "download", JOB, "-o", str(work / "out"), *args]
    if monkeypatch is None:
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("QLORA_", "OPENAI_"))}
        return subprocess.run([sys.executable, "-m", "cli", *argv], cwd=work, env={**clean, **env, "PYTHONPATH": str(REPO)},
                              capture_output=True, text=True, timeout=60)
    import tempfile

    from cli.main import main

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.chdir(work)
    out, err = io.StringIO(), io.StringIO()
    status = main(argv, out, err)
    return subprocess.CompletedProcess(argv, status, out.getvalue(), err.getvalue())


def files_under(root: Path) -> set[Path]:
    return {path for path in root.rglob("*") if not path.is_dir()}


def test_a_well_behaved_server_downloads_into_the_output_directory(server, tmp_path):
    """The baseline the hostile cases differ from: the archive unpacked into the directory, nothing elsewhere."""
    result = download(server, tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "work" / "out"
    assert files_under(tmp_path) == {out / "adapter_config.json", out / "adapter_model.safetensors"}
    server.hostile = Hostile(filename="metrics.csv", content=b"step,loss\n")
    assert download(server, tmp_path).returncode == 0 and (out / "metrics.csv").read_bytes() == b"step,loss\n"


def test_the_command_exits_1_with_one_line(server, tmp_path):
    """The exit status and stderr of the real process, for one hostile answer (the rest run in-process, below)."""
    server.hostile = Hostile(filename="..", content=b"x")
    result = download(server, tmp_path)
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("error: the server named file") and files_under(tmp_path) == set()


def escaping_archive() -> bytes:
    return tar_gz({"adapter_config.json": b"{}", "../../escaped.txt": b"out"})


def absolute_archive() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo("link")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    return buffer.getvalue()


HOSTILE = {
    "absolute file id": (Hostile(result_files=[str(Path("/tmp") / "qlora-hostile-abs")]), ()),
    "dot-dot file id": (Hostile(result_files=["file-../../x"]), ()),
    "a second id that is absolute": (Hostile(result_files=[FILE, "/etc/passwd"]), ()),
    "dot-dot name": (Hostile(filename="..", content=b"x"), ()),
    "dot name": (Hostile(filename=".", content=b"x"), ()),
    "empty name": (Hostile(filename="", content=b"x"), ()),
    "a path for a name": (Hostile(filename="../../escaped.txt", content=b"x"), ()),
    "absolute name": (Hostile(filename="/tmp/escaped.txt", content=b"x"), ()),
    "not an archive": (Hostile(content=b"<html>not a tarball</html>"), ()),
    "members that climb out": (Hostile(content=escaping_archive()), ()),
    "a link out": (Hostile(content=absolute_archive()), ()),
    "dot-dot checkpoint id": (Hostile(checkpoint_id="../../../files/x"), ("--checkpoint", "2")),
    "a checkpoint that is not an archive": (Hostile(checkpoint_content=b"\x1f\x8b not gzip"), ("--checkpoint", "2")),
}


@pytest.mark.parametrize("case", HOSTILE, ids=list(HOSTILE))
def test_a_hostile_server_gets_one_line_and_no_file_written(server, tmp_path, monkeypatch, case):
    hostile, args = HOSTILE[case]
    server.hostile = hostile
    outside = tmp_path.parent / f"{tmp_path.name}-outside"  # a sibling: what `..` from the output directory reaches
    outside.mkdir()
    before_outside = files_under(outside.parent)
    result = download(server, tmp_path, *args, monkeypatch=monkeypatch)
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    assert result.stdout == ""
    assert files_under(tmp_path) == set(), files_under(tmp_path)  # nothing in the output directory, no temp file left
    assert files_under(outside.parent) == before_outside
    assert not Path("/tmp/escaped.txt").exists() and not Path("/tmp/qlora-hostile-abs").exists()
    assert all(".." not in path and "//" not in path for path in hostile.requested), hostile.requested
