"""The Celery tasks: thin wrappers, by name, over plain functions (worker.runner, worker.export, worker.sweeper,
core.job_events, core.webhooks).

The settings, the database engine and the object storage are built once per process, on first use: in the
prefork pool that is inside the child that runs the task, so no connection is shared across a fork.
The runner, and with it torch, is imported at module load in the parent process, so that each fresh child
(one per job, see core/queue.py) starts with torch already imported. Importing torch does not initialise CUDA,
so forking after it is safe. The engine imports bitsandbytes, transformers and peft only when a job runs,
inside the child: bitsandbytes may initialise CUDA when imported, and a CUDA context must never exist in the
parent before a fork.
"""

from __future__ import annotations

from functools import lru_cache

from sqlalchemy.orm import Session, sessionmaker

from core import job_events, webhooks
from core.db import make_engine, make_session_factory
from core.dispatch import dispatch_quietly
from core.queue import EXPORT_TASK, JOB_ENDED_TASK, SWEEP_TASK, TRAIN_TASK, WEBHOOK_TASK
from core.settings import Settings, get_settings
from core.storage import ObjectStorage, make_storage
from worker import export, runner, sweeper
from worker.celery_app import app


def settings() -> Settings:
    return get_settings()


@lru_cache(maxsize=1)
def session_factory() -> sessionmaker[Session]:
    factory = make_session_factory(make_engine(settings().database_url))
    job_events.send_on_commit(factory, app, settings())  # a job this process ends is announced on commit
    return factory


@lru_cache(maxsize=1)
def storage() -> ObjectStorage:
    return make_storage(settings())


@app.task(name=TRAIN_TASK, bind=True)
def train(self, job_id: str) -> str:  # noqa: ANN001
    return runner.run_job(job_id, settings(), session_factory(), storage(), worker_id=runner.default_worker_id(self.request.id),
                          dispatch_next=lambda project: dispatch_quietly(session_factory(), app, settings(), project))


@app.task(name=EXPORT_TASK, bind=True)
def export_model(self, export_id: str) -> str:  # noqa: ANN001
    return export.run_export(export_id, settings(), session_factory(), storage(), worker_id=runner.default_worker_id(self.request.id),
                             dispatch_next=lambda project: dispatch_quietly(session_factory(), app, settings(), project))


@app.task(name=JOB_ENDED_TASK)
def job_ended(outbox_id: str) -> bool:
    return job_events.handle_job_ended(session_factory(), app, settings(), outbox_id)


@app.task(name=WEBHOOK_TASK)
def deliver_webhook(delivery_id: str) -> None:
    webhooks.deliver(session_factory(), app, settings(), delivery_id)


@app.task(name=SWEEP_TASK)
def sweep() -> dict[str, list[str]]:
    return sweeper.sweep(settings(), session_factory(), app, storage())
