"""The `qlora` command: argument parsing and one function per command. docs/cli.md is the user's guide.

Every command talks to the service through the openai SDK (its typed calls where OpenAI has the route, its
generic `get` for the service's extensions), so errors arrive as the SDK's exceptions and are printed as one line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import openai

from cli import output
from cli.output import EXIT_ERROR, EXIT_OK, EXIT_USAGE
from contract.job_file import SERVICE_KEYS, JobFileError, read_job_file

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
# OpenAI's method.type when a request names none; --method names any other the service supports (docs/training.md).
DEFAULT_METHOD = "supervised"


class UsageError(Exception):
    """A bad command line or job file: printed, exit status 2."""


class CommandFailed(Exception):
    """A command that ran but did not do its work (an upload with faults, a job without results): exit status 1."""


class Context:
    """The parsed global options, the client they make, and where output goes."""

    def __init__(self, args: argparse.Namespace, out: TextIO, err: TextIO):
        self.args = args
        self.out, self.err = out, err
        self.json = bool(getattr(args, "json", False))
        self.base_url = base_url_of(args)
        self._client: openai.OpenAI | None = None

    @property
    def client(self) -> openai.OpenAI:
        if self._client is None:
            key = api_key_of(self.args)
            if not key:
                raise UsageError("no API key: pass --api-key or set QLORA_API_KEY (or OPENAI_API_KEY); `make run` writes its key "
                                 "to .qlora/api_key, which is read when nothing else is set")
            self._client = openai.OpenAI(base_url=self.base_url, api_key=key, max_retries=getattr(self.args, "retries", 2))
        return self._client

    def print(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def note(self, text: str) -> None:
        """A remark for a person: stderr, so that stdout stays the command's result."""
        print(text, file=self.err, flush=True)

    def emit_json(self, value: Any) -> None:
        print(json.dumps(value, ensure_ascii=False), file=self.out, flush=True)


def base_url_of(args: argparse.Namespace) -> str:
    return (getattr(args, "base_url", None) or os.environ.get("QLORA_BASE_URL") or os.environ.get("OPENAI_BASE_URL")
            or DEFAULT_BASE_URL).rstrip("/")


def api_key_of(args: argparse.Namespace) -> str | None:
    """--api-key, QLORA_API_KEY, OPENAI_API_KEY, then the key file the embedded mode writes ($QLORA_HOME/api_key)."""
    key = getattr(args, "api_key", None) or os.environ.get("QLORA_API_KEY") or os.environ.get("OPENAI_API_KEY")
    if key:
        return key
    key_file = Path(os.environ.get("QLORA_HOME") or ".qlora") / "api_key"
    try:
        return key_file.read_text().strip() or None
    except OSError:
        return None


def as_dict(obj: Any) -> dict[str, Any]:
    """An SDK object as the JSON the API sent (fields it did not send left out)."""
    return obj.to_dict(mode="json") if hasattr(obj, "to_dict") else dict(obj)


def parse_value(text: str) -> Any:
    """A KEY=VALUE flag's value: JSON when it parses as JSON (16, 1e-3, true, [..]), else the string itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def key_values(pairs: list[str] | None, flag: str, typed: bool) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"{flag} takes KEY=VALUE, got {pair!r}")
        result[key] = parse_value(value) if typed else value
    return result


# --- files --------------------------------------------------------------------------------------------------


def upload(ctx: Context, path: Path, purpose: str = "fine-tune") -> dict[str, Any]:
    """Upload `path`; a file that fails the API's validation raises CommandFailed with its faults, one per line."""
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    with handle:
        uploaded = as_dict(ctx.client.files.create(file=(path.name, handle), purpose=purpose))
    if uploaded.get("status") == "error":
        faults = output.fault_lines(uploaded.get("status_details"))
        if ctx.json:
            ctx.emit_json(uploaded)
        lines = [f"error: {path} failed validation (stored as {uploaded['id']}, which no job can use):"] + [f"  {f}" for f in faults]
        raise CommandFailed("\n".join(lines))
    return uploaded


def cmd_files_upload(ctx: Context) -> int:
    uploaded = upload(ctx, ctx.args.file, ctx.args.purpose)
    if ctx.json:
        ctx.emit_json(uploaded)
    else:
        ctx.print(f"{uploaded['id']}  {uploaded['filename']}  {uploaded['bytes']} bytes  {uploaded['status']}")
    return EXIT_OK


def cmd_files_list(ctx: Context) -> int:
    files = [as_dict(f) for f in ctx.client.files.list(limit=ctx.args.limit).data]
    if ctx.json:
        ctx.emit_json(files)
    else:
        ctx.print(output.table([(f["id"], f["filename"], f["bytes"], f["purpose"], f["status"], output.timestamp(f["created_at"]))
                                for f in files], ("ID", "FILENAME", "BYTES", "PURPOSE", "STATUS", "CREATED")))
    return EXIT_OK


# --- jobs ---------------------------------------------------------------------------------------------------


def job_request(args: argparse.Namespace) -> tuple[dict[str, Any], Path | None]:
    """The job's fields from the job file (if any) with the flags over them, and the directory that relative
    file paths of the job file are relative to."""
    spec: dict[str, Any] = {}
    here = None
    if args.file is not None:
        try:
            spec = read_job_file(args.file, SERVICE_KEYS)  # the engine CLI's reader, so one file works with both
        except JobFileError as exc:
            raise UsageError(str(exc)) from None
        here = args.file.resolve().parent
        if "base_model" in spec and "model" not in spec:
            # The engine's base_model is a directory; the service names its base models by directory name.
            spec["model"] = Path(str(spec["base_model"])).name
        for engine_key, api_key in (("train_file", "training_file"),):
            if engine_key in spec and api_key not in spec:
                spec[api_key] = spec[engine_key]
    request: dict[str, Any] = {k: spec[k] for k in ("model", "training_file", "validation_file", "suffix", "seed", "metadata") if spec.get(k) is not None}
    hyper = dict(spec.get("hyperparameters") or {})
    # An engine job file names its method among the hyperparameters (TrainingConfig.method); the API takes it as
    # method.type. --method wins over the file.
    method = args.method or str(hyper.pop("method", None) or DEFAULT_METHOD)
    flags = {"model": args.model, "training_file": args.training_file, "validation_file": args.validation_file, "suffix": args.suffix,
             "seed": args.seed}
    request.update({k: v for k, v in flags.items() if v is not None})
    named = {"n_epochs": args.n_epochs, "batch_size": args.batch_size, "learning_rate": args.learning_rate, "max_steps": args.max_steps,
             "lora_r": args.lora_r, "beta": args.beta, "loss_type": args.loss_type, "simpo_gamma": args.simpo_gamma,
             "rpo_alpha": args.rpo_alpha}
    hyper.update({k: v for k, v in named.items() if v is not None})
    hyper.update(key_values(args.hyperparameter, "--hyperparameter", typed=True))
    metadata = {**(request.get("metadata") or {}), **key_values(args.metadata, "--metadata", typed=False)}
    if metadata:
        request["metadata"] = {str(k): str(v) for k, v in metadata.items()}
    if hyper or method != DEFAULT_METHOD:
        request["method"] = {"type": method, method: {"hyperparameters": hyper}}
    for required in ("model", "training_file"):
        if required not in request:
            raise UsageError(f"a job needs --{required.replace('_', '-')} (or `{required}:` in the job file)")
    return request, here


def beta_value(text: str) -> float | str:
    """--beta: a number, or OpenAI's "auto"; the range is the service's to check (a 400 naming the key)."""
    return text if text == "auto" else float(text)


def resolve_file(ctx: Context, value: str, here: Path | None, from_file: bool) -> str:
    """A file id as given, or a local path (relative to the job file when it came from there): uploaded first."""
    path = Path(value)
    if from_file and here is not None and not path.is_absolute():
        path = here / path
    if not path.is_file():
        return value
    uploaded = upload(ctx, path)
    ctx.note(f"uploaded {path} as {uploaded['id']}")
    return uploaded["id"]


def cmd_jobs_create(ctx: Context) -> int:
    args = ctx.args
    request, here = job_request(args)
    for key in ("training_file", "validation_file"):
        if key in request:
            request[key] = resolve_file(ctx, str(request[key]), here, from_file=getattr(args, key) is None)
    job = as_dict(ctx.client.fine_tuning.jobs.create(**request))
    if ctx.json:
        ctx.emit_json(job)
    else:
        ctx.print(f"{job['id']}  {job['status']}  {job['model']}")
        ctx.note(f"watch it with: qlora jobs watch {job['id']}")
    return EXIT_OK


def cmd_jobs_list(ctx: Context) -> int:
    kwargs: dict[str, Any] = {"limit": ctx.args.limit}
    if ctx.args.after:
        kwargs["after"] = ctx.args.after
    page = ctx.client.fine_tuning.jobs.list(**kwargs)
    jobs = [as_dict(j) for j in page.data]
    if ctx.json:
        ctx.emit_json(jobs)
        return EXIT_OK
    ctx.print(output.table([(j["id"], j["status"], j["model"], output.timestamp(j["created_at"]), output.timestamp(j.get("finished_at")),
                             j.get("fine_tuned_model")) for j in jobs], ("ID", "STATUS", "MODEL", "CREATED", "FINISHED", "FINE_TUNED_MODEL")))
    if page.has_more:
        ctx.note(f"more: qlora jobs list --after {jobs[-1]['id']}")
    return EXIT_OK


def cmd_jobs_get(ctx: Context) -> int:
    job = as_dict(ctx.client.fine_tuning.jobs.retrieve(ctx.args.job))
    if ctx.json:
        ctx.emit_json(job)
    else:
        ctx.print(output.job_summary(job))
    return EXIT_OK


def cmd_jobs_cancel(ctx: Context) -> int:
    return _job_action(ctx, ctx.client.fine_tuning.jobs.cancel)


def cmd_jobs_pause(ctx: Context) -> int:
    return _job_action(ctx, ctx.client.fine_tuning.jobs.pause)


def cmd_jobs_resume(ctx: Context) -> int:
    return _job_action(ctx, ctx.client.fine_tuning.jobs.resume)


def _job_action(ctx: Context, action: Callable[[str], Any]) -> int:
    """Cancel, pause or resume the job named on the command line; print its id and new status."""
    job = as_dict(action(ctx.args.job))
    if ctx.json:
        ctx.emit_json(job)
    else:
        ctx.print(f"{job['id']}  {job['status']}")
    return EXIT_OK


def cmd_jobs_watch(ctx: Context) -> int:
    from cli.watch import watch

    return watch(ctx, ctx.args.job, interval_s=ctx.args.interval, patience_s=ctx.args.patience)


def cmd_jobs_events(ctx: Context) -> int:
    events = [as_dict(e) for e in ctx.client.fine_tuning.jobs.list_events(ctx.args.job, limit=ctx.args.limit).data][::-1]
    if ctx.json:
        ctx.emit_json(events)
    else:
        for event in events:
            ctx.print(output.event_line(event))
    return EXIT_OK


def cmd_jobs_checkpoints(ctx: Context) -> int:
    checkpoints = [as_dict(c) for c in ctx.client.fine_tuning.jobs.checkpoints.list(ctx.args.job, limit=100).data]
    if ctx.json:
        ctx.emit_json(checkpoints)
        return EXIT_OK
    rows = [(c["id"], c["step_number"], _num(c["metrics"].get("train_loss")), _num(c["metrics"].get("valid_loss")),
             c["fine_tuned_model_checkpoint"]) for c in checkpoints]
    ctx.print(output.table(rows, ("ID", "STEP", "TRAIN_LOSS", "VALID_LOSS", "MODEL")))
    return EXIT_OK


def cmd_jobs_metrics(ctx: Context) -> int:
    """The per-step metrics (the service's extension GET /fine_tuning/jobs/{id}/metrics)."""
    page = ctx.client.get(f"/fine_tuning/jobs/{ctx.args.job}/metrics", cast_to=object, options={"params": {"limit": 10000}})
    rows = page.get("data", []) if isinstance(page, dict) else []
    if ctx.json:
        ctx.emit_json(rows)
    elif any("train_rewards_accuracies" in r for r in rows):  # a dpo job: its reward accuracy and margin, no token accuracy
        ctx.print(output.table([(r.get("step"), _num(r.get("train_loss")), _num(r.get("valid_loss")), _num(r.get("train_rewards_accuracies"), 3),
                                 _num(r.get("train_rewards_margins")), _num(r.get("valid_rewards_accuracies"), 3), _sci(r.get("learning_rate")),
                                 _num(r.get("tokens_per_second"), 0)) for r in rows],
                               ("STEP", "TRAIN_LOSS", "VALID_LOSS", "REWARD_ACC", "MARGIN", "VALID_REWARD_ACC", "LR", "TOK/S")))
    else:
        ctx.print(output.table([(r.get("step"), _num(r.get("train_loss")), _num(r.get("valid_loss")), _num(r.get("train_mean_token_accuracy")),
                                 _sci(r.get("learning_rate")), _num(r.get("tokens_per_second"), 0)) for r in rows],
                               ("STEP", "TRAIN_LOSS", "VALID_LOSS", "ACCURACY", "LR", "TOK/S")))
    return EXIT_OK


def _num(value: Any, digits: int = 4) -> str | None:
    return None if not isinstance(value, int | float) else f"{value:.{digits}f}"


def _sci(value: Any) -> str | None:
    return None if not isinstance(value, int | float) else f"{value:.2e}"


# --- download -----------------------------------------------------------------------------------------------
# What the server sends is not trusted: ids must have their documented shape before they go into a URL, names are
# bare file names, files are written under local temp names and moved into the output directory only once every
# one of them arrived and unpacked; anything else is a one-line error (exit 1) with nothing left behind.

FILE_ID = re.compile(r"file-[A-Za-z0-9_-]{1,100}")
CHECKPOINT_ID = re.compile(r"ftckpt[_-][A-Za-z0-9_-]{1,100}")


def _well_formed(value: Any, pattern: re.Pattern[str], what: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise CommandFailed(f"error: the server sent a malformed {what} {value!r}; nothing was downloaded")
    return value


def _bare_name(filename: Any, file_id: str) -> str:
    """The server's file name as a name in the output directory: no directory part, not '.', '..' or empty."""
    name = filename if isinstance(filename, str) else ""
    if name in ("", ".", "..") or any(c in name for c in "/\\\0") or name != name.strip():
        raise CommandFailed(f"error: the server named file {file_id} {filename!r}, not a plain file name; nothing was downloaded")
    return name


def _extract(archive: Path, into: Path, what: str) -> list[str]:
    """Unpack a .tar.gz into `into` (a staging directory); the member names, relative to it."""
    names: list[str] = []

    def keep(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo | None:
        member = tarfile.data_filter(member, path)  # leading '/' dropped; '..' out, links out, devices refused
        if member.isfile():
            names.append(member.name)  # the name as extracted
        return member

    try:
        with tarfile.open(archive, mode="r:gz") as tar:
            tar.extractall(into, filter=keep)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise CommandFailed(f"error: {what} is not a valid .tar.gz archive ({exc}); nothing was downloaded") from None
    return names


def _move_into(stage: Path, names: list[str], into: Path) -> list[str]:
    """Move the staged files into the output directory (made now, once everything has arrived)."""
    into.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names:
        target = into / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(stage / name, target)
        written.append(str(target))
    return written


def cmd_download(ctx: Context) -> int:
    """The job's result files into DIR: the adapter archive unpacked (adapter_config.json, the weights), the
    metrics CSV as is; or, with --checkpoint, that checkpoint's archive unpacked."""
    client, job_id = ctx.client, ctx.args.job
    job = as_dict(client.fine_tuning.jobs.retrieve(job_id))
    into: Path = ctx.args.output or Path(job_id)
    with tempfile.TemporaryDirectory(prefix="qlora-download-") as tmp:
        stage = Path(tmp) / "stage"
        stage.mkdir()
        names: list[str] = []
        if ctx.args.checkpoint:
            checkpoint = _find_checkpoint(client, job_id, ctx.args.checkpoint)
            checkpoint_id = _well_formed(checkpoint.get("id"), CHECKPOINT_ID, "checkpoint id")
            archive = Path(tmp) / "checkpoint.tar.gz"
            archive.write_bytes(client.get(f"/fine_tuning/jobs/{job_id}/checkpoints/{checkpoint_id}/content", cast_to=bytes))
            names = _extract(archive, stage, f"checkpoint {checkpoint_id}")
        else:
            if job.get("status") != "succeeded" or not isinstance(job.get("result_files"), list) or not job["result_files"]:
                raise CommandFailed(f"error: job {job_id} is {job.get('status')}; only a succeeded job has an adapter to download "
                                    "(--checkpoint STEP downloads a checkpoint)")
            file_ids = [_well_formed(file_id, FILE_ID, "file id") for file_id in job["result_files"]]
            for index, file_id in enumerate(file_ids):
                name = _bare_name(client.files.retrieve(file_id).filename, file_id)
                local = Path(tmp) / f"download-{index}"  # a local name: nothing the server chose
                with client.with_streaming_response.files.content(file_id) as response:
                    response.stream_to_file(local)
                if name.endswith(".tar.gz"):
                    names += _extract(local, stage, f"{name} ({file_id})")
                else:
                    shutil.move(local, stage / name)
                    names.append(name)
        written = _move_into(stage, list(dict.fromkeys(names)), into)
    if ctx.json:
        ctx.emit_json({"job": job_id, "directory": str(into), "files": written})
    else:
        for path in written:
            ctx.print(path)
    return EXIT_OK


def _find_checkpoint(client: openai.OpenAI, job_id: str, wanted: str) -> dict[str, Any]:
    """A checkpoint by id or by step number."""
    for checkpoint in client.fine_tuning.jobs.checkpoints.list(job_id, limit=100):
        c = as_dict(checkpoint)
        if c.get("id") == wanted or str(c.get("step_number")) == wanted:
            return c
    raise CommandFailed(f"error: job {job_id} has no checkpoint {wanted!r} (qlora jobs checkpoints {job_id} lists them)")


# --- models -------------------------------------------------------------------------------------------------


def cmd_models_list(ctx: Context) -> int:
    models = [as_dict(m) for m in ctx.client.models.list().data]
    if ctx.json:
        ctx.emit_json(models)
    else:
        ctx.print(output.table([(m["id"], m.get("owned_by"), output.timestamp(m.get("created"))) for m in models], ("ID", "OWNED_BY", "CREATED")))
    return EXIT_OK


# --- the parser ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    # The common options are accepted before the command and after it (`qlora --json jobs list`, `qlora jobs list
    # --json`): SUPPRESS keeps a subcommand's unset copy from overwriting the one given first.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--base-url", default=argparse.SUPPRESS, help=f"the API's URL (QLORA_BASE_URL, OPENAI_BASE_URL; default {DEFAULT_BASE_URL})")
    common.add_argument("--api-key", default=argparse.SUPPRESS, help="the API key (QLORA_API_KEY, OPENAI_API_KEY, else $QLORA_HOME/api_key)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable JSON output, no decoration")
    common.add_argument("--retries", type=int, default=argparse.SUPPRESS, help="retries of a failed request (default 2)")

    parser = argparse.ArgumentParser(prog="qlora", parents=[common], description="Fine-tune models on a qlora-service: upload data, "
                                     "create and watch jobs, download adapters. docs/cli.md has the details and the exit statuses.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def leaf(group: Any, name: str, func: Callable[[Context], int], help_text: str) -> argparse.ArgumentParser:
        sub = group.add_parser(name, parents=[common], help=help_text, description=help_text)
        sub.set_defaults(func=func)
        return sub

    files = commands.add_parser("files", help="upload and list training files").add_subparsers(dest="files_command", required=True, metavar="COMMAND")
    p = leaf(files, "upload", cmd_files_upload, "upload a JSONL file; its faults, if any, are shown by line")
    p.add_argument("file", type=Path)
    p.add_argument("--purpose", default="fine-tune")
    p = leaf(files, "list", cmd_files_list, "list the project's files, newest first")
    p.add_argument("--limit", type=int, default=100)

    jobs = commands.add_parser("jobs", help="create, list, watch and cancel fine-tuning jobs").add_subparsers(
        dest="jobs_command", required=True, metavar="COMMAND")
    p = leaf(jobs, "create", cmd_jobs_create, "create a fine-tuning job from flags and/or a YAML job file (flags win)")
    p.add_argument("-f", "--file", type=Path, help="a YAML job file (the engine CLI's format works: examples/smollm2-facts.yaml)")
    p.add_argument("-m", "--model", help="the base model (qlora models list)")
    p.add_argument("-t", "--training-file", help="a file id, or a local JSONL file to upload first")
    p.add_argument("-v", "--validation-file", help="a file id, or a local JSONL file to upload first")
    p.add_argument("--suffix", help="part of the fine-tuned model's name")
    p.add_argument("--seed", type=int)
    p.add_argument("--method", help=f"the training method, OpenAI's method.type: {DEFAULT_METHOD} (the default) or dpo")
    p.add_argument("--n-epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--lora-r", type=int)
    p.add_argument("--beta", type=beta_value, help="dpo: OpenAI's beta, 0 < beta <= 2, or auto (the service checks it)")
    p.add_argument("--loss-type", choices=("sigmoid", "ipo", "simpo", "orpo"), help="dpo: the preference loss (default sigmoid)")
    p.add_argument("--simpo-gamma", type=float, help="dpo with --loss-type simpo: the target reward margin")
    p.add_argument("--rpo-alpha", type=float, help="dpo: weight of an NLL term on the preferred answers")
    p.add_argument("-p", "--hyperparameter", action="append", metavar="KEY=VALUE", help="any training option (docs/training.md); repeatable")
    p.add_argument("--metadata", action="append", metavar="KEY=VALUE", help="a metadata pair; repeatable")
    p = leaf(jobs, "list", cmd_jobs_list, "list jobs, newest first")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--after", help="list the jobs older than this job id")
    p = leaf(jobs, "get", cmd_jobs_get, "show a job")
    p.add_argument("job")
    p = leaf(jobs, "watch", cmd_jobs_watch, "follow a job's progress and events until it ends; the exit status is its outcome "
                                            "(0 succeeded, 3 failed, 4 cancelled)")
    p.add_argument("job")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between polls (default 2)")
    p.add_argument("--patience", type=float, default=600.0,
                   help="seconds in a row to wait for a service that stopped answering before giving up (default 600)")
    p = leaf(jobs, "cancel", cmd_jobs_cancel, "cancel a queued, running or paused job")
    p.add_argument("job")
    p = leaf(jobs, "pause", cmd_jobs_pause, "pause a queued job, or a running one after its current step (with a checkpoint)")
    p.add_argument("job")
    p = leaf(jobs, "resume", cmd_jobs_resume, "queue a paused job again; it continues from its pause checkpoint")
    p.add_argument("job")
    p = leaf(jobs, "events", cmd_jobs_events, "a job's latest events, oldest first")
    p.add_argument("job")
    p.add_argument("--limit", type=int, default=20)
    p = leaf(jobs, "checkpoints", cmd_jobs_checkpoints, "a job's checkpoints with their metrics")
    p.add_argument("job")
    p = leaf(jobs, "metrics", cmd_jobs_metrics, "a job's per-step metrics")
    p.add_argument("job")

    p = leaf(commands, "download", cmd_download, "download a succeeded job's adapter and metrics (or a checkpoint) into a directory")
    p.add_argument("job")
    p.add_argument("-o", "--output", type=Path, help="the directory (default ./JOB_ID)")
    p.add_argument("--checkpoint", help="a checkpoint's id or step number instead of the final adapter")

    models = commands.add_parser("models", help="list models").add_subparsers(dest="models_command", required=True, metavar="COMMAND")
    leaf(models, "list", cmd_models_list, "the base models and the project's fine-tuned models")
    return parser


def main(argv: list[str] | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    args = build_parser().parse_args(argv)
    ctx = Context(args, out, err)
    try:
        return args.func(ctx)
    except UsageError as exc:
        print(f"error: {exc}", file=err)
        return EXIT_USAGE
    except CommandFailed as exc:
        print(str(exc), file=err)
        return EXIT_ERROR
    except openai.APIError as exc:
        print(output.api_error_line(exc, ctx.base_url), file=err)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return output.EXIT_INTERRUPTED
    except BrokenPipeError:  # `qlora jobs list | head`: the reader left; stop writing, quietly (Python's own advice)
        os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())  # so the flush at exit does not fail again
        return EXIT_OK
