"""Several API processes, one scrape target: `uvicorn --workers 2` in prometheus_client's multiprocess mode and
`python -m api.metrics_server` on QLORA_METRICS_PORT, which sums every process's request counts and reads the rest
from the database."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx

from tests.api.processes import api_env
from tests.conftest import REPO, free_port, wait_for_port


def test_one_metrics_port_counts_the_requests_of_every_api_process(tmp_path, sqlite_url, redis_url):
    multiproc = tmp_path / "prometheus"
    multiproc.mkdir()
    env = api_env(home=str(tmp_path / "home"), database_url=sqlite_url, broker_url=redis_url, api_keys="sk-test",
                  task_queue=f"mp-{free_port()}")
    env["PROMETHEUS_MULTIPROC_DIR"] = str(multiproc)
    api_port, metrics_port = free_port(), free_port()
    log = (tmp_path / "processes.log").open("w")
    api = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "api.main:create_app", "--host", "127.0.0.1",
                            "--port", str(api_port), "--workers", "2"], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    server = subprocess.Popen([sys.executable, "-m", "api.metrics_server"], env={**env, "QLORA_METRICS_PORT": str(metrics_port)},
                              cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(api_port, timeout_s=60)
        wait_for_port(metrics_port, timeout_s=60)
        with httpx.Client() as client:
            for _ in range(40):  # new connections: either process may answer each (the kernel picks)
                assert client.get(f"http://127.0.0.1:{api_port}/healthz", headers={"Connection": "close"}).status_code == 200
        # A request is counted once its answer has gone out, so the last may reach the files a moment after it.
        expected = 'qlora_api_requests_total{method="GET",route="/healthz",status="200"} 40.0'
        deadline = time.monotonic() + 10
        while True:
            text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
            if expected in text or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for proc in (api, server):
            proc.terminate()
            proc.wait(timeout=20)
        log.close()
    assert list(multiproc.glob("counter_*.db")), (tmp_path / "processes.log").read_text()[-3000:]  # counted in files, not in memory
    assert expected in text, text
    assert "qlora_jobs" in text or "qlora_sweeper_actions_total" in text  # read from the database by the server
