"""The Celery app's configuration, shared by the API (which only sends tasks, by name) and the workers.

Each setting carries its reason. The job row in the database is the truth of a job; a task message only says
"run job X". The API commits the row first and sends the message after, so a fast worker never looks for a
row that is not there yet.
"""

from __future__ import annotations

import base64
import json

from celery import Celery

from core.settings import Settings

TRAIN_TASK = "qlora.train"
SWEEP_TASK = "qlora.sweep"
# A merged export needs the base model in 16 bits and the memory training needs, so it runs on the training queue.
EXPORT_TASK = "qlora.export"
# "A job ended" (core/job_events.py): what follows a job's end. On the control queue: it must not wait behind hours of
# training.
JOB_ENDED_TASK = "qlora.job_ended"
# One attempt of a webhook delivery (core/webhooks.py): on the control queue too, seconds of work at most.
WEBHOOK_TASK = "qlora.deliver_webhook"


def control_queue(settings: Settings) -> str:
    """The queue of the sweep task. Not the training queue: a GPU worker runs one job at a time for hours, and
    a sweep queued behind it would wait that long; a small CPU-only worker (the `beat` service, or the embedded
    worker between jobs) serves this queue."""
    return f"{settings.task_queue}-control"


def _is_redis(broker_url: str) -> bool:
    return broker_url.startswith(("redis://", "rediss://", "redis+socket://", "sentinel://"))


def _is_sqlite(broker_url: str) -> bool:
    return broker_url.startswith("sqla+sqlite")


def _transport_options(broker_url: str) -> dict:
    if _is_redis(broker_url):
        return {"visibility_timeout": 6 * 3600}
    if _is_sqlite(broker_url):
        # kombu's SQLAlchemy transport hands these to create_engine. The embedded broker's file is written by the API,
        # the worker and beat at once: SQLite's default 5 s wait for its lock ran out on a loaded machine and the
        # worker's consumer restarted; 30 s rides that out.
        return {"connect_args": {"timeout": 30}}
    return {}


def make_celery(settings: Settings) -> Celery:
    app = Celery("qlora", broker=settings.broker_url)
    app.conf.update(
        task_default_queue=settings.task_queue,
        task_serializer="json",
        accept_content=["json"],
        # Nothing reads task results: progress, metrics and outcome are written to the database by the worker.
        task_ignore_result=True,
        # Ack on receipt (early). A training task runs for hours, longer than any sane visibility timeout: acked
        # late, Redis would hand the same message to a second worker while the first still trains. A worker that
        # dies mid-job is found by the sweeper through the job's heartbeat and the job resumed from its last
        # checkpoint, so the message is not needed for recovery.
        task_acks_late=False,
        # One job per GPU process: a worker takes one task at a time and reserves none it cannot start now
        # (a prefetched task would wait behind a long job while another worker sits idle).
        worker_concurrency=1,
        worker_prefetch_multiplier=1,
        # With early acks the multiplier still lets a busy worker reserve one more message; on Redis this turns
        # that off, so a queued job stays in the queue for the first idle worker. (Celery supports it on Redis only.)
        worker_disable_prefetch=_is_redis(settings.broker_url),
        # A fresh child process per job, so that every byte of GPU memory and every CUDA context of one job is
        # returned before the next starts.
        worker_max_tasks_per_child=1,
        # Only unacked messages are redelivered after this; with early acks that is a message a worker took but
        # died before acking (seconds). Longer than any plausible start-up so no message is handed out twice.
        # (Redis only: kombu's SQLAlchemy transport hands its transport options to create_engine, which
        # rejects this one.)
        broker_transport_options=_transport_options(settings.broker_url),
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        # The sweeper (lost workers, expired queued tasks) runs on Celery beat: `celery worker -B` in the
        # embedded mode, one beat process in a deployment.
        # A sweep not started within one interval is dropped (the next one is on its way), so sweeps never pile up.
        task_routes={SWEEP_TASK: {"queue": control_queue(settings)}, JOB_ENDED_TASK: {"queue": control_queue(settings)},
                     WEBHOOK_TASK: {"queue": control_queue(settings)}},
        beat_schedule={
            "sweep-lost-jobs": {"task": SWEEP_TASK, "schedule": settings.sweep_interval_s, "options": {"expires": settings.sweep_interval_s}}
        },
    )
    return app


def _training_queues(settings: Settings) -> list[str]:
    """The training queues: one per GPU count a job may ask for."""
    return [training_queue(settings, n) for n in range(1, settings.max_gpus_per_job + 1)]


def _training_lists(settings: Settings) -> list[str]:
    """The Redis lists of the training queues: kombu keeps one list per priority step of each."""
    return [name for queue in _training_queues(settings) for name in [queue] + [f"{queue}\x06\x16{step}" for step in (3, 6, 9)]]


def training_queue_depth(app: Celery, settings: Settings) -> int | None:
    """How many messages wait on the training queue (training and export tasks), or None where the broker cannot be
    read (only Redis is). LLEN of each list: constant work however long the queue, unlike reading the messages."""
    if not _is_redis(settings.broker_url):
        return None
    with app.connection_for_read() as conn:
        client = conn.default_channel.client
        return sum(int(client.llen(name)) for name in _training_lists(settings))


def training_queue(settings: Settings, n_gpus: int = 1) -> str:
    """The queue of the training tasks of jobs on `n_gpus` GPUs: QLORA_TASK_QUEUE for one, `<queue>-<n>gpu` for more.
    A worker with QLORA_WORKER_GPUS=n serves `<queue>-<n>gpu` (and, if it should also take smaller jobs, theirs): a
    job reaches only workers that own enough GPUs, and the broker, not a claim-time check, keeps it waiting for one."""
    return settings.task_queue if n_gpus <= 1 else f"{settings.task_queue}-{n_gpus}gpu"


def queued_training_jobs(app: Celery, settings: Settings) -> set[str] | None:
    """The job ids whose training message waits in the broker's queue, or None where the broker cannot be read
    (Redis and the embedded SQLite broker can). kombu keeps a Redis queue as a list per priority step, and a SQLite
    queue as rows (a taken message stays, marked invisible), of JSON envelopes whose body is the base64 of Celery's
    [args, kwargs, embed]."""
    if _is_redis(settings.broker_url):
        with app.connection_for_read() as conn:
            client = conn.default_channel.client
            raws = [raw for name in _training_lists(settings) for raw in client.lrange(name, 0, -1)]
    elif _is_sqlite(settings.broker_url):
        with app.connection_for_read() as conn:
            channel = conn.default_channel
            messages, queue_rows = channel.message_cls, channel.queue_cls
            try:
                raws = [payload for (payload,) in channel.session.query(messages.payload).join(queue_rows, messages.queue_id == queue_rows.id)
                        .filter(queue_rows.name.in_(_training_queues(settings)), messages.visible.is_(True))]
            finally:
                channel.session.rollback()  # end the read: the file's lock is shared with every other process
    else:
        return None
    found: set[str] = set()
    for raw in raws:
        try:
            message = json.loads(raw)
            if message.get("headers", {}).get("task") == TRAIN_TASK:
                found.add(str(json.loads(base64.b64decode(message["body"]))[0][0]))
        except (ValueError, KeyError, IndexError, TypeError):
            continue  # not a message of ours
    return found


def send_training_task(app: Celery, settings: Settings, job_id: str, n_gpus: int = 1) -> None:
    """Send the training task by name (the API never imports task code) to the queue of jobs on `n_gpus` GPUs, with
    an expiry: a message that no worker takes in time is dropped by the broker side and the sweeper sends the job
    again."""
    app.send_task(TRAIN_TASK, args=[job_id], queue=training_queue(settings, n_gpus), expires=settings.task_expires_s)


def job_gpus(training_config: dict | None) -> int:
    """The GPUs a job's stored options ask for (rows from before n_gpus: one)."""
    return int((training_config or {}).get("n_gpus") or 1)


def send_export_task(app: Celery, settings: Settings, export_id: str) -> None:
    """Send the export task by name to the training queue, with the same expiry as a training task (the sweeper
    sends a queued export again, as it does a job)."""
    app.send_task(EXPORT_TASK, args=[export_id], queue=settings.task_queue, expires=settings.task_expires_s)


def send_job_ended_task(app: Celery, settings: Settings, outbox_id: str) -> None:
    """Send "job ended" (an outbox row's id) to the control queue. No expiry: a late message is still worth handling,
    and a handled row makes a second one do nothing."""
    app.send_task(JOB_ENDED_TASK, args=[outbox_id], queue=control_queue(settings))


def send_webhook_task(app: Celery, settings: Settings, delivery_id: str, countdown: float = 0) -> None:
    """Send one attempt of a webhook delivery to the control queue, `countdown` seconds ahead. No expiry: the
    attempt's claim makes a late or second copy do nothing when the delivery is not due."""
    app.send_task(WEBHOOK_TASK, args=[delivery_id], queue=control_queue(settings), countdown=countdown or None)
