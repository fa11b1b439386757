"""The training file format: parse and validate a JSONL file of examples, for the API's upload check and the engine.

A training file holds one example a line, in one of three supervised shapes (mixed shapes are allowed):

- chat: ``{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str, "weight"?: 0|1}, ...]}``
- prompt/completion: ``{"prompt": str, "completion": str}``
- plain text: ``{"text": str}``

or, for preference tuning (``method.type = "dpo"``), one pair a line in OpenAI's DPO shape, never mixed with the
supervised shapes: ``{"input": {"messages": [...], "tools"?: [...], "parallel_tool_calls"?: bool},
"preferred_output": [one assistant message], "non_preferred_output": [one assistant message]}``. The input's
messages end before the answer (no trailing assistant turn); `tools` and `parallel_tool_calls` are accepted and
ignored (only text is trained on here). `ValidationReport.kind` says which of the two a file is.

`validate_file` reads the file once and reports every fault it finds (OpenAI's codes ``invalid_file_format``
and ``invalid_n_examples``), with bounded memory even for a hostile file; `load_examples` does the same and
raises `DataValidationError` if anything is wrong. Tokenization and batching are the engine's
(worker/training/data.py).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, BinaryIO, Literal

MIN_EXAMPLES = 10
MAX_LINE_BYTES = 8 * 1024 * 1024  # a longer line is a fault, read without ever holding more than this
MAX_REPORTED_FAULTS = 100
MAX_FAULT_MESSAGE_CHARS = 300

INVALID_FILE_FORMAT = "invalid_file_format"
INVALID_N_EXAMPLES = "invalid_n_examples"

ExampleFormat = Literal["chat", "prompt_completion", "text", "preference"]
# What a file is for: the job's method must match (OpenAI's method types "supervised" and "dpo").
FileKind = Literal["supervised", "preference"]

ROLES = ("system", "user", "assistant", "tool")
# Keys OpenAI's chat format allows on a message that do not change what we train on; accepted and dropped.
IGNORED_MESSAGE_KEYS = frozenset({"name", "tool_calls", "tool_call_id"})
MESSAGE_KEYS = frozenset({"role", "content", "weight"}) | IGNORED_MESSAGE_KEYS
# Top-level bookkeeping keys a dataset may carry on any line; accepted and dropped.
IGNORED_TOP_LEVEL_KEYS = frozenset({"id", "metadata"})
SHAPE_KEYS: dict[str, frozenset[str]] = {
    "chat": frozenset({"messages"}),
    "prompt_completion": frozenset({"prompt", "completion"}),
    "text": frozenset({"text"}),
    "preference": frozenset({"input", "preferred_output", "non_preferred_output"}),
}
EXPECTED_SHAPES = "'messages' (chat), 'prompt' and 'completion', 'text', or 'input', 'preferred_output' and 'non_preferred_output' (preference)"
PREFERENCE_INPUT_KEYS = frozenset({"messages", "tools", "parallel_tool_calls"})

_UTF8_BOM = b"\xef\xbb\xbf"
_SKIP_CHUNK_BYTES = 1024 * 1024  # the rest of an over-long line is read and dropped in pieces this size


# --- validation ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataFault:
    """One problem in a training file. `line` is 1-based, None for a fault of the whole file."""

    line: int | None
    code: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


FileRole = Literal["training", "validation"]


def _label(role: FileRole) -> str:
    return "Validation file" if role == "validation" else "Training file"


class DataValidationError(ValueError):
    """A training file with faults. `faults` holds every fault found (up to MAX_REPORTED_FAULTS), `code` is
    the first one's code, and `message` a summary that names the first few and the total count."""

    def __init__(self, faults: list[DataFault], n_faults: int | None = None, role: FileRole = "training"):
        if not faults:
            raise ValueError("DataValidationError needs at least one fault")
        self.role = role  # which file of the job: "training" or "validation"
        self.faults = list(faults)
        self.n_faults = n_faults if n_faults is not None else len(faults)
        self.code = faults[0].code
        shown = "; ".join(f.message for f in faults[:3])
        more = self.n_faults - min(3, len(faults))
        noun = "problem" if self.n_faults == 1 else "problems"
        self.message = f"{_label(role)} has {self.n_faults} {noun}: {shown}" + (f" (and {more} more)" if more else "")
        super().__init__(self.message)


@dataclass(frozen=True)
class Example:
    """One valid line of a training file, normalised: chat message contents are strings and each message
    holds only role, content and (when given) weight. A preference pair keeps its input's messages in `messages`
    and the two answers' contents in `preferred` and `non_preferred`."""

    line: int
    format: ExampleFormat
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    completion: str | None = None
    text: str | None = None
    preferred: str | None = None
    non_preferred: str | None = None


@dataclass
class ValidationReport:
    """What `validate_file` found. `faults` keeps at most MAX_REPORTED_FAULTS; `n_faults` counts them all."""

    n_examples: int
    faults: list[DataFault]
    n_faults: int
    formats: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.n_faults == 0

    @property
    def kind(self) -> FileKind | None:
        """"preference" for a file of pairs, "supervised" for one of examples, None when no line was valid."""
        if not self.formats:
            return None
        return "preference" if "preference" in self.formats else "supervised"


class _LineFault(Exception):
    """Raised inside the per-line checks; carries the message without the 'line N: ' prefix."""


def _clip(message: str) -> str:
    """A fault message quotes keys and roles from the file: cut it to MAX_FAULT_MESSAGE_CHARS, so that the faults
    of a hostile file (lines of up to 8 MiB) stay a few kilobytes in `status_details` and in errors."""
    if len(message) <= MAX_FAULT_MESSAGE_CHARS:
        return message
    suffix = f"... ({len(message)} chars)"
    return message[: MAX_FAULT_MESSAGE_CHARS - len(suffix)] + suffix


def validate_file(path: str | os.PathLike[str] | BinaryIO, *, min_examples: int = MIN_EXAMPLES,
                  role: FileRole = "training") -> ValidationReport:
    """Check a JSONL training file (a path, or a binary stream read line by line, never whole) and report every
    fault. Never raises on bad content (a missing or unreadable file still raises OSError)."""
    _, report = _scan(path, min_examples=min_examples, keep_examples=False, role=role)
    return report


def load_examples(path: str | os.PathLike[str], *, min_examples: int = MIN_EXAMPLES, role: FileRole = "training") -> list[Example]:
    """Read a JSONL training file into examples; raise `DataValidationError` with every fault if any. `role`
    names the file in messages and on the error ("Validation file has 2 problems: ...")."""
    examples, report = _scan(path, min_examples=min_examples, keep_examples=True, role=role)
    if not report.ok:
        raise DataValidationError(report.faults, report.n_faults, role)
    return examples


def _scan(path: str | os.PathLike[str] | BinaryIO, *, min_examples: int, keep_examples: bool,
          role: FileRole) -> tuple[list[Example], ValidationReport]:
    examples: list[Example] = []
    line_faults: list[DataFault] = []
    n_line_faults = 0
    formats: Counter[str] = Counter()
    n_nonblank = 0

    def add_fault(line_no: int, message: str) -> None:
        nonlocal n_line_faults
        n_line_faults += 1
        if len(line_faults) < MAX_REPORTED_FAULTS:
            line_faults.append(DataFault(line=line_no, code=INVALID_FILE_FORMAT, message=message))

    with contextlib.nullcontext(path) if hasattr(path, "readline") else open(path, "rb") as fh:  # type: ignore[arg-type]
        line_no = 0
        while True:
            # The limit makes a giant line arrive in bounded pieces instead of being held whole.
            raw = fh.readline(MAX_LINE_BYTES + 1)
            if not raw:
                break
            line_no += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                del raw  # drop the first 8 MiB before reading on
                n_nonblank += 1
                add_fault(line_no, f"line {line_no} is longer than {MAX_LINE_BYTES // (1024 * 1024)} MiB")
                _skip_rest_of_line(fh)
                continue
            if line_no == 1 and raw.startswith(_UTF8_BOM):
                raw = raw[len(_UTF8_BOM) :]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                n_nonblank += 1
                add_fault(line_no, f"line {line_no} is not valid UTF-8 (invalid byte at offset {exc.start})")
                continue
            if not text.strip():
                continue  # blank lines separate nothing and are not examples
            n_nonblank += 1
            try:
                example = _parse_line(line_no, text)
            except _LineFault as fault:
                add_fault(line_no, f"line {line_no}: {_clip(str(fault))}")
                continue
            formats[example.format] += 1
            if keep_examples:
                examples.append(example)

    n_examples = sum(formats.values())
    file_faults: list[DataFault] = []
    if formats.get("preference") and n_examples > formats["preference"]:
        file_faults.append(DataFault(line=None, code=INVALID_FILE_FORMAT, message=(
            f"{_label(role)} mixes {formats['preference']} preference pair(s) with {n_examples - formats['preference']} "
            "supervised example(s); a file holds one or the other")))
    if n_nonblank == 0:
        file_faults.append(DataFault(line=None, code=INVALID_FILE_FORMAT, message=f"{_label(role)} is empty"))
    elif n_examples < min_examples:
        file_faults.append(
            DataFault(
                line=None,
                code=INVALID_N_EXAMPLES,
                message=f"{_label(role)} has {n_examples} example(s), but must have at least {min_examples} examples",
            )
        )
    # Whole-file faults are always kept: under a flood of line faults they are still the headline.
    kept_line_faults = line_faults[: MAX_REPORTED_FAULTS - len(file_faults)]
    report = ValidationReport(
        n_examples=n_examples,
        faults=kept_line_faults + file_faults,
        n_faults=n_line_faults + len(file_faults),
        formats=dict(formats),
    )
    return examples, report


def _skip_rest_of_line(fh: Any) -> None:
    while True:
        chunk = fh.readline(_SKIP_CHUNK_BYTES)
        if not chunk or chunk.endswith(b"\n"):
            return


def _parse_line(line_no: int, text: str) -> Example:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _LineFault(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise _LineFault("not valid JSON (nested too deeply)") from None
    if not isinstance(obj, dict):
        raise _LineFault(f"expected a JSON object, got {_json_type(obj)}")

    shapes = [name for name, keys in SHAPE_KEYS.items() if keys & obj.keys()]
    if not shapes:
        keys = ", ".join(repr(k) for k in obj) or "none"
        raise _LineFault(f"expected an object with {EXPECTED_SHAPES} (got keys: {keys})")
    if len(shapes) > 1:
        found = ", ".join(repr(k) for name in shapes for k in sorted(SHAPE_KEYS[name] & obj.keys()))
        raise _LineFault(f"mixes the keys of several example shapes ({found}); use one of {EXPECTED_SHAPES}")
    shape = shapes[0]
    unknown = obj.keys() - SHAPE_KEYS[shape] - IGNORED_TOP_LEVEL_KEYS
    if unknown:
        allowed = sorted(SHAPE_KEYS[shape] | IGNORED_TOP_LEVEL_KEYS)
        raise _LineFault(f"unknown key(s) {_key_list(unknown)} (allowed: {', '.join(allowed)})")

    if shape == "chat":
        return Example(line=line_no, format="chat", messages=_check_messages(obj["messages"]))
    if shape == "preference":
        return _parse_preference(line_no, obj)
    if shape == "prompt_completion":
        for key in ("prompt", "completion"):
            if key not in obj:
                raise _LineFault(f"has 'prompt' or 'completion' but not both (missing {key!r})")
            if not isinstance(obj[key], str):
                raise _LineFault(f"{key!r} must be a string, got {_json_type(obj[key])}")
        if not obj["completion"].strip():
            raise _LineFault("'completion' is empty (nothing to train on)")
        return Example(line=line_no, format="prompt_completion", prompt=obj["prompt"], completion=obj["completion"])
    value = obj["text"]
    if not isinstance(value, str):
        raise _LineFault(f"'text' must be a string, got {_json_type(value)}")
    if not value.strip():
        raise _LineFault("'text' is empty")
    return Example(line=line_no, format="text", text=value)


def _parse_preference(line_no: int, obj: dict[str, Any]) -> Example:
    for key in sorted(SHAPE_KEYS["preference"]):
        if key not in obj:
            raise _LineFault(f"a preference pair needs 'input', 'preferred_output' and 'non_preferred_output' (missing {key!r})")
    given = obj["input"]
    if not isinstance(given, dict):
        raise _LineFault(f"'input' must be an object, got {_json_type(given)}")
    if "messages" not in given:
        raise _LineFault("'input' has no 'messages'")
    unknown = given.keys() - PREFERENCE_INPUT_KEYS
    if unknown:
        raise _LineFault(f"'input' has unknown key(s) {_key_list(unknown)} (allowed: {', '.join(sorted(PREFERENCE_INPUT_KEYS))})")
    if "tools" in given and not isinstance(given["tools"], list):
        raise _LineFault(f"'input.tools' must be a list, got {_json_type(given['tools'])}")
    messages = _check_messages(given["messages"], where_prefix="input ", needs_target=False)
    if messages[-1]["role"] == "assistant":
        raise _LineFault("'input.messages' ends with an assistant message; the answers go in 'preferred_output' and 'non_preferred_output'")
    if any("weight" in m for m in messages):
        raise _LineFault("'input.messages' has a weight; in a preference pair only the outputs are trained on")
    preferred = _single_answer(obj, "preferred_output")
    non_preferred = _single_answer(obj, "non_preferred_output")
    return Example(line=line_no, format="preference", messages=messages, preferred=preferred, non_preferred=non_preferred)


def _single_answer(obj: dict[str, Any], key: str) -> str:
    """The content of a preference output: a list of exactly one assistant message with non-empty text."""
    value = obj[key]
    if not isinstance(value, list) or len(value) != 1:
        got = f"{len(value)} messages" if isinstance(value, list) else _json_type(value)
        raise _LineFault(f"{key!r} must be a list of exactly one assistant message, got {got}")
    (message,) = _check_messages(value, where_prefix=f"{key} ", needs_target=False)
    if message["role"] != "assistant":
        raise _LineFault(f"{key!r} holds a {message['role']} message; it must be an assistant message")
    if "weight" in message:
        raise _LineFault(f"{key!r} has a weight; both outputs of a pair are always trained on")
    if not message["content"].strip():
        raise _LineFault(f"{key!r} has empty content (nothing to compare)")
    return message["content"]


def _check_messages(messages: Any, *, where_prefix: str = "", needs_target: bool = True) -> list[dict[str, Any]]:
    """Normalised messages; `needs_target=False` for a preference pair's input and outputs, which need no trained
    assistant message of their own. `where_prefix` names the list in faults ("input message 2 ...")."""
    name = "'input.messages'" if where_prefix == "input " else "'messages'"
    if not isinstance(messages, list):
        raise _LineFault(f"{name} must be a list, got {_json_type(messages)}")
    if not messages:
        raise _LineFault(f"{name} is empty")
    normalised: list[dict[str, Any]] = []
    n_assistant = n_trained = 0
    for i, message in enumerate(messages, start=1):
        where = f"{where_prefix}message {i}"
        if not isinstance(message, dict):
            raise _LineFault(f"{where} must be an object, got {_json_type(message)}")
        for key in ("role", "content"):
            if key not in message:
                raise _LineFault(f"{where} has no {key!r}")
        unknown = message.keys() - MESSAGE_KEYS
        if unknown:
            raise _LineFault(f"{where} has unknown key(s) {_key_list(unknown)} (allowed: {', '.join(sorted(MESSAGE_KEYS))})")
        role = message["role"]
        if role not in ROLES:
            raise _LineFault(f"{where} has unknown role {role!r} (expected system, user, assistant or tool)")
        content = _message_content(where, message["content"])
        entry: dict[str, Any] = {"role": role, "content": content}
        if "weight" in message:
            weight = message["weight"]
            # type() rather than isinstance: JSON true/false are bools, and bool is a subclass of int.
            if type(weight) is not int or weight not in (0, 1):
                raise _LineFault(f"{where} has weight {json.dumps(weight)} (expected 0 or 1)")
            if role != "assistant":
                raise _LineFault(f"{where} has a weight but is a {role} message (only assistant messages take one)")
            entry["weight"] = weight
        if role == "assistant":
            n_assistant += 1
            n_trained += entry.get("weight", 1)
        normalised.append(entry)
    if not needs_target:
        return normalised
    if n_assistant == 0:
        raise _LineFault("has no assistant message (nothing to train on)")
    if n_trained == 0:
        raise _LineFault("every assistant message has weight 0 (nothing to train on)")
    return normalised


def _message_content(where: str, content: Any) -> str:
    if isinstance(content, str):
        return content
    # OpenAI's content-parts form; only text parts can be trained on here, joined as OpenAI joins them.
    if isinstance(content, list) and content:
        texts = []
        for j, part in enumerate(content, start=1):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _LineFault(f'{where} content part {j} is not a text part {{"type": "text", "text": str}}')
            texts.append(part["text"])
        return "".join(texts)
    raise _LineFault(f"{where} content must be a string or a list of text parts, got {_json_type(content)}")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _key_list(keys: Any) -> str:
    return ", ".join(repr(k) for k in sorted(keys))
