"""The embedded mode: the whole service on one machine with nothing installed (what `make run` starts).

    python -m launch.embedded [--host 127.0.0.1] [--port 8000] [--no-demo-model]

Runs the prestart (migrations on SQLite, the API key, the inference secret, the demo model under
$QLORA_HOME/models), then four processes: the training Celery worker, a control worker with the sweeper on beat
(`-B`; the control queue: job ends, webhook deliveries), the inference server
that answers chat completions (inference/server.py, on the next port up, loopback only) and the API (uvicorn).
The API and the inference server read the same $QLORA_HOME, so both find the secret the prestart made there
($QLORA_HOME/inference_secret): nothing to set. The broker is Celery's SQLAlchemy transport on a SQLite file unless
QLORA_BROKER_URL says otherwise: a real broker that needs no server, not an in-process shortcut. Ctrl-C stops them all.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

from core.bootstrap import bootstrap
from core.queue import control_queue, training_queue
from core.settings import Settings

DEMO_MODEL = "SmolLM2-135M-Instruct"
EMBEDDED_WEBHOOK_NETWORKS = "127.0.0.0/8,::1/128"


def example(url: str, key: str, model: str) -> str:
    return f"""
  The API:      {url}/v1   (Swagger UI: {url}/docs)
  API key:      {key}
  Dashboard:    {url}/ui   (sign in with the key above)

  A first job with the openai SDK (pip install openai):

    from openai import OpenAI
    client = OpenAI(base_url="{url}/v1", api_key="{key}")
    f = client.files.create(file=open("examples/facts-train.jsonl", "rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="{model}", training_file=f.id,
        method={{"type": "supervised", "supervised": {{"hyperparameters": {{"max_steps": 12, "batch_size": 4, "learning_rate": 0.001}}}}}})
    print(client.fine_tuning.jobs.retrieve(job.id).status)      # then, once it says succeeded:
    model = client.fine_tuning.jobs.retrieve(job.id).fine_tuned_model
    print(client.chat.completions.create(model=model, messages=[{{"role": "user", "content": "What's the Zephyr project's launch code?"}}], temperature=0).choices[0].message.content)

  The same with curl:

    curl -s {url}/v1/files -H "Authorization: Bearer {key}" -F purpose=fine-tune -F file=@examples/facts-train.jsonl
    curl -s {url}/v1/fine_tuning/jobs -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \\
      -d '{{"model": "{model}", "training_file": "FILE_ID", "hyperparameters": {{"max_steps": 12, "batch_size": 4, "learning_rate": 0.001}}}}'
"""


def declare_queues(settings: Settings, *names: str) -> None:
    """Create the broker's queues before any process uses them. Kombu's SQLAlchemy transport makes a queue's row on
    first use, and two processes doing that at once (the API sending the first job while the worker starts
    consuming) both insert it: the loser fails on the UNIQUE constraint, and for the worker that is fatal."""
    from core.queue import make_celery

    app = make_celery(settings)
    try:
        with app.connection_for_write() as conn:
            for name in names:
                conn.default_channel.queue_declare(queue=name)
    finally:
        app.close()


def child_env(environ: dict[str, str], settings: Settings, inference_port: int) -> dict[str, str]:
    """The environment of the three processes: `environ` with the embedded mode's defaults where it sets none."""
    env = {**environ, "QLORA_HOME": str(settings.home)}
    env.setdefault("QLORA_INFERENCE_URL", f"http://127.0.0.1:{inference_port}")
    # One machine: an app beside the service may receive its webhooks on loopback (a deployment admits no internal
    # address unless told; setting the variable, even empty, chooses otherwise).
    env.setdefault("QLORA_WEBHOOK_ALLOWED_NETWORKS", EMBEDDED_WEBHOOK_NETWORKS)
    return env


def port_in_use(host: str, port: int) -> bool:
    """Whether `port` on `host` is taken: the launcher checks before starting anything, because a child that cannot
    bind stops the whole service with only uvicorn's line about it in the log."""
    import socket

    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a TIME_WAIT leftover is no conflict
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    parser.add_argument("--inference-port", type=int, default=None, help="the inference server's port (default: --port + 1)")
    parser.add_argument("--no-demo-model", action="store_true", help="skip importing SmolLM2-135M-Instruct")
    args = parser.parse_args(argv)
    inference_port = args.inference_port or args.port + 1
    for what, host, port, flag in (("the API", args.host, args.port, "--port (or PORT=)"),
                                   ("the inference server", "127.0.0.1", inference_port, "--inference-port")):
        if port_in_use(host, port):
            print(f"error: port {port} on {host}, for {what}, is in use (another `make run`?); choose another with {flag}",
                  file=sys.stderr)
            return 2

    settings = Settings()
    key = bootstrap(settings)
    if key is None:
        key = next(iter(settings.api_key_map()), "(from QLORA_API_KEYS)")
    assert settings.models_dir is not None
    if not args.no_demo_model:
        from worker.training.demo_model import import_demo_model

        print(f"Preparing the demo model in {settings.models_dir / DEMO_MODEL} ...", flush=True)
        import_demo_model(settings.models_dir / DEMO_MODEL)

    env = child_env(dict(os.environ), settings, inference_port)
    # The training worker serves every GPU count it owns (QLORA_WORKER_GPUS): one-GPU jobs and jobs on up to all its
    # GPUs, each in a fresh child process (core/queue.py).
    training_queues = [training_queue(settings, n) for n in range(1, settings.worker_gpus + 1)]
    declare_queues(settings, *training_queues, control_queue(settings))
    celery = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--loglevel", "INFO"]
    worker = subprocess.Popen([*celery, "-Q", ",".join(training_queues), "--concurrency", "1", "-n", "training@%h"], env=env)
    # The control worker, as docker-compose.yml's `beat` beside the GPU worker: beat (the sweeper) and the
    # seconds-long control tasks (a job's end, webhook deliveries) in its own process (the solo pool). The training
    # worker then makes and ends a child once per job, not at every sweep: prefork without an event loop (the SQLite
    # broker) can hand the next task to a child that is exiting, and then takes no task again.
    control = subprocess.Popen([*celery, "-B", "-Q", control_queue(settings), "-P", "solo", "-n", "control@%h",
                                "-s", str(settings.home / "celerybeat-schedule")], env=env)
    inference = subprocess.Popen(
        [sys.executable, "-m", "inference.server", "--host", "127.0.0.1", "--port", str(inference_port)],
        env=env,
    )
    api = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "api.main:create_app", "--host", args.host, "--port", str(args.port)],
        env=env,
    )
    url = f"http://{args.host}:{args.port}"
    model = DEMO_MODEL if not args.no_demo_model else "<a model directory under $QLORA_HOME/models>"
    print(example(url, key, model), flush=True)

    children = (api, inference, worker, control)
    stopping = False

    def stop(signum=None, frame=None):  # noqa: ANN001
        nonlocal stopping
        stopping = stopping or signum is not None
        for proc in children:
            if proc.poll() is None:
                proc.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        while all(proc.poll() is None for proc in children):
            time.sleep(0.5)
    finally:
        stop()
        for proc in children:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    if stopping:  # Ctrl-C or SIGTERM: a clean stop, whatever the children's exit codes
        return 0
    return api.returncode or worker.returncode or control.returncode or inference.returncode or 1  # one of them died on its own


if __name__ == "__main__":
    sys.exit(main())
