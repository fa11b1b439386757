"""Fair dispatch (core/dispatch.py) through the API and the worker's claim: one project's queued jobs put one
message in the broker at a time, so another project's first job waits behind one job, not all of them."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.main import create_app
from core.dispatch import dispatch_quietly
from core.settings import Settings
from core.tables import Job
from tests.api.helpers import KEY_A, KEY_B, MODEL, create_job, db, queued_tasks, upload_ok
from tests.job_ended import deliver_job_ended, outbox_rows
from worker import runner


def in_broker(redis_url: str, settings: Settings) -> list[str]:
    """The job ids of the training messages in the broker's queue, oldest first (kombu pushes on the left)."""
    return [args[0] for _, args in reversed(queued_tasks(redis_url, settings.task_queue))]


def make_client(settings: Settings, **overrides) -> TestClient:
    return TestClient(create_app(settings.model_copy(update=overrides)))


def new_jobs(client: TestClient, headers: dict[str, str], n: int) -> list[str]:
    training_file = upload_ok(client, headers=headers)["id"]
    jobs = []
    for _ in range(n):
        response = create_job(client, training_file, headers=headers, model=MODEL)
        assert response.status_code == 200, response.text
        jobs.append(response.json()["id"])
    return jobs


def test_another_projects_first_job_waits_behind_one_job(settings, redis_url):
    with make_client(settings) as client:
        a = new_jobs(client, KEY_A, 3)
        [b] = new_jobs(client, KEY_B, 1)
        assert in_broker(redis_url, settings) == [a[0], b]  # a[1] and a[2] wait in the database, unsent
        # A worker takes a[0] (a model that cannot load: it fails at once, which is all this needs): its claim sends
        # project A's next job, behind B's.
        app = client.app
        dispatch = lambda project: dispatch_quietly(app.state.session_factory, app.state.celery, settings, project)  # noqa: E731
        assert runner.run_job(a[0], settings, app.state.session_factory, app.state.storage, dispatch_next=dispatch) == runner.FAILED
        assert in_broker(redis_url, settings) == [a[0], b, a[1]]
        # Cancelling a sent job passes its turn on too, through "a job ended" (core/job_events.py): the cancel's
        # commit announces it, the control worker's handling sends the next job.
        assert client.post(f"/v1/fine_tuning/jobs/{a[1]}/cancel", headers=KEY_A).status_code == 200
        assert in_broker(redis_url, settings)[-1] == a[1]
        assert deliver_job_ended(redis_url, settings, app.state.session_factory, app.state.celery) == [True, True]  # a[0]'s, a[1]'s
        assert in_broker(redis_url, settings) == [a[0], b, a[1], a[2]]
        for job_id, status in ((a[0], "failed"), (a[1], "cancelled")):
            [row] = outbox_rows(app.state.session_factory, job_id)
            assert row.status == status and row.handled_at is not None


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_running_jobs_per_project_are_capped(settings, redis_url):
    with make_client(settings, max_running_jobs_per_project=2, queued_messages_per_project=5) as client:
        a = new_jobs(client, KEY_A, 4)
        assert in_broker(redis_url, settings) == a[:2]  # two may run at once: the third waits for one to end
        with db(client) as session:
            unsent = set(session.scalars(select(Job.id).where(Job.enqueued_at.is_(None))))
        assert unsent == set(a[2:])
