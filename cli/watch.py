"""`qlora jobs watch JOB`: poll the job and its events until it ends, showing progress as it comes.

Progress comes from the job's metrics events (worker/database_sink.py writes one per logged step, its data holding
the step's metrics and total_steps), so the events endpoint alone gives both the event log and the progress. On a
terminal the progress is a tqdm bar with events printed above it; otherwise (a pipe, a CI log) each update is a
plain line, and with --json one JSON object a line.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import openai

from cli import output

if TYPE_CHECKING:
    from cli.main import Context

PAGE = 200  # events fetched a request


class EventFollower:
    """The events of one job not yet seen, oldest first. The API lists events newest first and only appends, so
    new events are those above the newest one seen; several pages are read when more than a page arrived."""

    def __init__(self, client: openai.OpenAI, job_id: str):
        self.client, self.job_id = client, job_id
        self.newest_seen: str | None = None

    def new_events(self) -> list[dict[str, Any]]:
        fresh: list[dict[str, Any]] = []
        after: str | None = None
        while True:
            kwargs: dict[str, Any] = {"limit": PAGE}
            if after is not None:
                kwargs["after"] = after
            page = self.client.fine_tuning.jobs.list_events(self.job_id, **kwargs)
            reached = False
            for event in page.data:
                if event.id == self.newest_seen:
                    reached = True
                    break
                fresh.append(event.to_dict(mode="json"))
            if reached or not page.has_more or not page.data:
                break
            after = page.data[-1].id
        if fresh:
            self.newest_seen = fresh[0]["id"]
        return fresh[::-1]


class Display:
    """Where updates go: a bar on a terminal, plain lines elsewhere, JSON lines with --json."""

    def __init__(self, ctx: Context, job_id: str):
        self.ctx, self.job_id = ctx, job_id
        self.mode = "json" if ctx.json else "bar" if ctx.out.isatty() else "lines"
        self.bar: Any = None

    def event(self, event: dict[str, Any]) -> None:
        data = event.get("data") or {}
        is_progress = event.get("type") == "metrics" and isinstance(data.get("step"), int)
        if self.mode == "json":
            self.ctx.emit_json(event)
            if is_progress:
                self.ctx.emit_json({"object": "fine_tuning.job.progress", "job_id": self.job_id, **output.progress_fields(data)})
        elif self.mode == "lines":
            self.ctx.print(output.progress_line(data) if is_progress else output.event_line(event))
        elif is_progress:
            self._advance(data)
        else:
            self._write(output.event_line(event))

    def _advance(self, data: dict[str, Any]) -> None:
        from tqdm import tqdm

        total = data.get("total_steps")
        if self.bar is None:
            # The metrics go in `desc`, placed after the bar: tqdm's {postfix} would start with ', '.
            self.bar = tqdm(total=total, file=self.ctx.out, dynamic_ncols=True, leave=True, unit="step",
                            bar_format="step {n_fmt}/{total_fmt} {percentage:3.0f}%|{bar}| {desc}")
        if total is not None and self.bar.total != total:
            self.bar.total = total
        self.bar.n = data["step"]
        self.bar.set_description_str(output.bar_postfix(data), refresh=False)
        self.bar.refresh()

    def _write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=self.ctx.out)
        else:
            self.ctx.print(line)

    def finish(self, job: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.mode == "json":
            self.ctx.emit_json(job)
            return
        status = job["status"]
        if status == "succeeded":
            tail = f": {job.get('fine_tuned_model')}, {job.get('trained_tokens')} trained tokens (qlora download {job['id']})"
        elif status == "failed" and job.get("error"):
            error = job["error"]
            param = f" (param {error['param']})" if error.get("param") else ""
            tail = f": {error.get('code')}: {error.get('message')}{param}"
        else:
            tail = ""
        self.ctx.print(f"job {job['id']} {status}{tail}")


def watch(ctx: Context, job_id: str, interval_s: float = 2.0, patience_s: float = 600.0) -> int:
    """Follow the job to its end; the exit status is its outcome (output.OUTCOME_EXIT). Once the job has been seen, a
    service that cannot be reached or answers 5xx (a restart, a network blip) is waited for up to `patience_s`
    seconds in a row; other API errors end the watch at once."""
    client = ctx.client
    follower = EventFollower(client, job_id)
    display = Display(ctx, job_id)
    seen_job, down_since = False, None
    try:
        while True:
            try:
                # The job first, its events after: an event written before the job ended is read in this same round.
                job = client.fine_tuning.jobs.retrieve(job_id).to_dict(mode="json")
                for event in follower.new_events():
                    display.event(event)
            except (openai.APIConnectionError, openai.InternalServerError) as exc:
                if not seen_job:
                    raise
                if down_since is None:
                    down_since = time.monotonic()
                    ctx.note(f"the service does not answer ({type(exc).__name__}); still watching, for up to {patience_s:g} s")
                elif time.monotonic() - down_since > patience_s:
                    raise
                time.sleep(interval_s)
                continue
            if down_since is not None:
                ctx.note("the service answers again")
            seen_job, down_since = True, None
            if job["status"] in output.TERMINAL:
                display.finish(job)
                return output.OUTCOME_EXIT[job["status"]]
            time.sleep(interval_s)
    except KeyboardInterrupt:
        if display.bar is not None:
            display.bar.close()
        ctx.note(f"stopped watching; the job goes on (qlora jobs watch {job_id})")
        return output.EXIT_INTERRUPTED
