"""The embedded inference engine: chat generation with transformers + peft, adapters attached by name.

One base model is loaded per base id, on first use, at most `max_bases` at once (loading another unloads the least
recently used one). LoRA adapters are attached to a base on demand (`load_adapter`), at most `max_adapters` per
base: the least recently used one is dropped first, so a request rarely reloads a base or an adapter. Adapters
come from object storage by key (the `.tar.gz` a job or a checkpoint stored), their files unpacked into a cache
directory bounded by `cache_max_bytes` (inference/adapters.py) and attached with peft.

Generation is one at a time per engine (a CPU or one GPU runs one `generate` fastest); requests wait for it, and
one whose caller went away (`cancelled`) leaves the line or stops at the next token. The server
(inference/server.py) bounds how many may wait.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from core.storage import ObjectStorage
from inference.adapters import AdapterError, cached_path, check_key, fetch_adapter, is_adapter_dir, remove_cached, trim_cache

log = logging.getLogger(__name__)


class ModelNotFound(LookupError):
    """The engine serves no model of that name (not a base under models_dir, not a loaded adapter)."""


class GenerationCancelled(Exception):
    """The caller went away while the request waited for its turn: nothing was generated."""


class InvalidRequest(ValueError):
    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass
class ChatRequest:
    """What a chat completion asks of the engine (the server has validated the wire format)."""

    model: str
    messages: list[dict[str, str]]
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class ChatResult:
    text: str
    finish_reason: str  # "stop" (end of turn or a stop string) | "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Prepared:
    request: ChatRequest
    base: LoadedBase
    adapter: str | None
    input_ids: torch.Tensor
    max_new_tokens: int


@dataclass
class LoadedBase:
    name: str
    model: Any  # the transformers model, or the peft PeftModel wrapping it once an adapter is attached
    tokenizer: Any
    context_length: int
    adapters: OrderedDict[str, str] = field(default_factory=OrderedDict)  # served name -> peft adapter name, LRU order


def _dtype(name: str) -> torch.dtype:
    from worker.training.model import resolve_compute_dtype

    resolved = resolve_compute_dtype(name, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[resolved]


class ChatEngine:
    def __init__(self, models_dir: Path, storage: ObjectStorage, cache_dir: Path, *, max_adapters: int = 8,
                 base_weights: str = "16bit", dtype: str = "auto", max_new_tokens: int = 512, max_bases: int = 2,
                 cache_max_bytes: int = 20 << 30, local_adapter_root: Path | None = None):
        """`local_adapter_root`: a directory whose unpacked adapters may be named by absolute path, as vLLM takes
        them (the vLLM front's shared volume, when this engine stands in for vLLM); None: object keys only."""
        self.models_dir = models_dir
        self.storage = storage
        self.cache_dir = cache_dir
        self.cache_max_bytes = cache_max_bytes
        self.local_adapter_root = local_adapter_root.resolve() if local_adapter_root is not None else None
        self.max_adapters = max_adapters
        self.max_bases = max_bases
        self.base_weights = base_weights  # "16bit" | "nf4"
        self.dtype = _dtype(dtype)
        self.max_new_tokens = max_new_tokens
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.bases: OrderedDict[str, LoadedBase] = OrderedDict()  # least recently used first
        self.served: dict[str, str] = {}  # adapter name -> its base's name
        self.keys: dict[str, str] = {}  # adapter name -> the object key it was loaded from
        self._generating = threading.Lock()  # one generate() at a time, in arrival order
        self._loading = threading.Lock()  # model and adapter loads, one at a time
        self._adapter_ids = 0

    # --- models -----------------------------------------------------------------------------------------

    def base(self, name: str) -> LoadedBase:
        """The loaded base model `name`, loading it on first use (and unloading the least recently used base past
        `max_bases`; a generation already under way on it finishes on the model it holds)."""
        if name in self.bases:
            self.bases.move_to_end(name)
            return self.bases[name]
        path = self.models_dir / name
        if not name or "/" in name or name.startswith(".") or not (path / "config.json").is_file():
            raise ModelNotFound(name)
        with self._loading:
            if name not in self.bases:
                with self._generating:
                    while len(self.bases) >= self.max_bases:
                        self._unload_base(next(iter(self.bases)))
                self.bases[name] = self._load_base(name, path)
        return self.bases[name]

    def _unload_base(self, name: str) -> None:
        base = self.bases.pop(name)
        for adapter_name in list(base.adapters):
            self.served.pop(adapter_name, None)
            self.keys.pop(adapter_name, None)
        base.adapters.clear()  # a prepared request for one of them is a 404 now: the API loads it again
        # The weights go with the last reference: a generation under way on this base finishes first.
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.info("unloaded base %s (more than %d bases)", name, self.max_bases)

    def _load_base(self, name: str, path: Path) -> LoadedBase:
        from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

        started = time.monotonic()
        kwargs: dict[str, Any] = {"dtype": self.dtype}
        # A base stored quantized (GPTQ, AWQ: its config.json says how) loads as stored; nf4 applies to float bases.
        quantize_on_load = self.base_weights == "nf4" and "quantization_config" not in json.loads((path / "config.json").read_text())
        if quantize_on_load:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=self.dtype)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        if not quantize_on_load:
            model.to(self.device)
        model.eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        context = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
        log.info("loaded base %s (%s, %s) in %.1fs", name, self.base_weights, self.dtype, time.monotonic() - started)
        return LoadedBase(name, model, tokenizer, context)

    def load_adapter(self, name: str, key: str, base_name: str) -> None:
        """Attach the adapter stored at object `key` to base `base_name`, served as `name`. Loading a name that is
        already served is a no-op (adapters are immutable: a name always means the same archive). Raises
        AdapterError for a key that is no adapter's (inference/adapters.py), or a local path outside
        `local_adapter_root`."""
        base = self.base(base_name)
        with self._loading:
            if name in base.adapters:
                base.adapters.move_to_end(name)
                return
            directory = self._local_dir(key) if Path(key).is_absolute() else fetch_adapter(self.storage, key, self.cache_dir)
            with self._generating:  # attaching changes the modules a running generate() uses
                self._attach(base, name, directory)
                self.served[name] = base_name
                self.keys[name] = key
                while len(base.adapters) > self.max_adapters:
                    self._detach(base, next(iter(base.adapters)))
            attached = {cached_path(self.cache_dir, k) for k in self.keys.values()}
            for gone in trim_cache(self.cache_dir, self.cache_max_bytes, attached):
                log.info("deleted cached adapter %s (the cache is over %d bytes)", gone.name, self.cache_max_bytes)

    def _local_dir(self, path: str) -> Path:
        directory = Path(path).resolve()
        if self.local_adapter_root is None or not directory.is_relative_to(self.local_adapter_root) or not is_adapter_dir(directory):
            raise AdapterError(f"'{path}' is not the object key of an adapter archive (files/... or checkpoints/...)")
        return directory

    def unload_adapter(self, name: str, key: str | None = None) -> bool:
        """Detach `name` if attached, and delete the unpacked files of `key` (or of the key it was loaded from): its
        model was deleted. `key` reaches copies the engine no longer attaches (dropped by the LRU, or unpacked
        before a restart). True when there was something to drop."""
        if key is not None:
            check_key(key)
        with self._loading, self._generating:
            base_name = self.served.get(name)
            loaded_from = self._detach(self.bases[base_name], name) if base_name is not None else None
            removed = False
            for k in {k for k in (key, loaded_from) if k is not None and not Path(k).is_absolute()}:  # a local directory is its owner's
                removed = remove_cached(self.cache_dir, k) or removed
        return base_name is not None or removed

    def _attach(self, base: LoadedBase, name: str, directory: Path) -> None:
        from peft import PeftModel

        self._adapter_ids += 1
        adapter = f"a{self._adapter_ids}"  # peft names become module keys: no dots or colons allowed
        try:
            if isinstance(base.model, PeftModel):
                base.model.load_adapter(str(directory), adapter_name=adapter)
            else:
                base.model = PeftModel.from_pretrained(base.model, str(directory), adapter_name=adapter)
        except (ValueError, RuntimeError, KeyError) as exc:
            raise AdapterError(f"the adapter does not fit {base.name}: {exc}") from None
        base.model.eval()
        base.adapters[name] = adapter

    def _detach(self, base: LoadedBase, name: str) -> str:
        """Drop adapter `name` from the model; returns the key it came from (its unpacked copy stays cached)."""
        adapter = base.adapters.pop(name)
        self.served.pop(name, None)
        if base.adapters:
            base.model.delete_adapter(adapter)
        else:  # the last one: peft cannot run with no adapter at all, so the base goes back to its plain modules
            base.model = base.model.unload()
        log.info("dropped adapter %s from %s", name, base.name)
        return self.keys.pop(name)

    def resolve(self, model: str) -> tuple[LoadedBase, str | None]:
        """The base and the peft adapter name (None: the base alone) that serve `model`."""
        base_name = self.served.get(model)
        if base_name is not None:
            base = self.bases[base_name]
            base.adapters.move_to_end(model)
            return base, base.adapters[model]
        return self.base(model), None

    def models(self) -> list[str]:
        return sorted(self.bases) + sorted(self.served)

    @contextmanager
    def _turn(self, cancelled: threading.Event | None) -> Iterator[None]:
        """Hold the one generation slot; a caller that goes away (`cancelled`) while waiting leaves the line."""
        while not self._generating.acquire(timeout=0.05):
            if cancelled is not None and cancelled.is_set():
                raise GenerationCancelled
        try:
            yield
        finally:
            self._generating.release()

    # --- generation -------------------------------------------------------------------------------------

    def prompt_ids(self, base: LoadedBase, messages: list[dict[str, str]]) -> torch.Tensor:
        """The chat formatted with the base model's own chat template, as token ids."""
        text = base.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return base.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids

    def prepare(self, request: ChatRequest) -> Prepared:
        """Check the request against the model before any token is generated: the model exists, the messages
        and max_tokens fit its context. Raises ModelNotFound or InvalidRequest."""
        base, adapter = self.resolve(request.model)
        input_ids = self.prompt_ids(base, request.messages)
        room = base.context_length - input_ids.shape[1]
        if room <= 0:
            raise InvalidRequest(f"The messages take {input_ids.shape[1]} tokens; the model's context is {base.context_length}.",
                                 "messages")
        if request.max_tokens is not None and request.max_tokens > room:
            raise InvalidRequest(f"max_tokens is {request.max_tokens}, but only {room} tokens fit after the messages "
                                 f"in the model's context of {base.context_length}.", "max_tokens")
        max_new = request.max_tokens if request.max_tokens is not None else min(room, self.max_new_tokens)
        return Prepared(request, base, adapter, input_ids, max_new)

    def complete(self, request: ChatRequest, on_text: Callable[[str], None] | None = None,
                 cancelled: threading.Event | None = None) -> ChatResult:
        return self.generate(self.prepare(request), on_text, cancelled)

    def generate(self, prepared: Prepared, on_text: Callable[[str], None] | None = None,
                 cancelled: threading.Event | None = None) -> ChatResult:
        """Generate one answer; `on_text` receives it piece by piece as it is produced (for streaming). Setting
        `cancelled` (the caller went away) ends the generation at the next token, or raises GenerationCancelled
        while it still waits for its turn."""
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        stop_found = threading.Event()  # set by the reader below; transformers' own stop_strings would also match the prompt

        class Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):  # noqa: ANN001, ANN003, ANN204
                return stop_found.is_set() or (cancelled is not None and cancelled.is_set())

        request, base, adapter, input_ids, max_new = (prepared.request, prepared.base, prepared.adapter, prepared.input_ids,
                                                      prepared.max_new_tokens)
        streamer = TextIteratorStreamer(base.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs: dict[str, Any] = {"input_ids": input_ids.to(self.device), "attention_mask": torch.ones_like(input_ids).to(self.device),
                                  "max_new_tokens": max_new, "streamer": streamer,
                                  "stopping_criteria": StoppingCriteriaList([Stop()]),
                                  "pad_token_id": base.tokenizer.pad_token_id or base.tokenizer.eos_token_id}
        if request.temperature > 0:
            kwargs.update(do_sample=True, temperature=request.temperature, top_p=request.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        output: dict[str, torch.Tensor] = {}

        def run() -> None:
            try:
                with torch.inference_mode():
                    if request.seed is not None:
                        torch.manual_seed(request.seed)
                    if adapter is None and hasattr(base.model, "disable_adapter"):
                        with base.model.disable_adapter():
                            output["ids"] = base.model.generate(**kwargs)
                    else:
                        if adapter is not None:
                            base.model.set_adapter(adapter)
                        output["ids"] = base.model.generate(**kwargs)
            except BaseException as exc:  # surfaced below, after the streamer is released
                output["error"] = exc  # type: ignore[assignment]
                streamer.end()

        with self._turn(cancelled):
            if cancelled is not None and cancelled.is_set():
                raise GenerationCancelled
            if adapter is not None and adapter not in base.adapters.values():
                raise ModelNotFound(request.model)  # dropped (LRU or unload) since prepare(): the caller loads it again
            thread = threading.Thread(target=run, name="generate", daemon=True)
            thread.start()
            text, stopped = _stream_until_stop(iter(streamer), request.stop, on_text, stop_found)
            thread.join()
        if "error" in output:
            raise output["error"]  # type: ignore[misc]
        new_ids = output["ids"][0, input_ids.shape[1]:]
        completion_tokens = int(new_ids.shape[0])
        ended_turn = completion_tokens > 0 and int(new_ids[-1]) == base.tokenizer.eos_token_id
        finish = "stop" if stopped or ended_turn or completion_tokens < max_new else "length"
        return ChatResult(text, finish, int(input_ids.shape[1]), completion_tokens)


def _stream_until_stop(pieces: Iterator[str], stops: list[str], on_text: Callable[[str], None] | None,
                       stop_found: threading.Event) -> tuple[str, bool]:
    """Join the generated pieces, cut at the first stop string (setting `stop_found`, which ends the generation),
    and hand each settled piece to `on_text`. Text that could still be the start of a stop string is held back
    until it is known not to be one."""
    text, sent, stopped = "", 0, False
    hold = max((len(s) for s in stops), default=1) - 1
    for piece in pieces:
        if stopped:
            continue  # drain, so the generating thread ends
        text += piece
        cut = min((i for s in stops if (i := text.find(s)) >= 0), default=-1)
        if cut >= 0:
            text, stopped = text[:cut], True
            stop_found.set()
            settled = len(text)
        else:
            settled = max(sent, len(text) - hold)
        if on_text is not None and settled > sent:
            on_text(text[sent:settled])
            sent = settled
    if on_text is not None and len(text) > sent:
        on_text(text[sent:])
    return text, stopped
