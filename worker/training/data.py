"""Training data for the engine: load and tokenize a file, order its units each epoch, group them into
micro-batches and collate those into tensors.

`load_tokenized` is the loader of the SFT formats (chat, prompt/completion, text): `tokenize_example` turns an
example (parsed and validated by contract.data_format) into input ids and labels that train only on what the
model should learn to write (assistant turns, completions) unless ``train_on_inputs`` is set, always keeping
the EOS token in the labels so the model learns to stop. A method with another data shape adds its loader here.
`epoch_order` and `micro_batches` work on any method's units (anything with `n_tokens`); `collate_packed` and
`collate_padded` build the micro-batches of token rows. The tokenizer is a transformers tokenizer passed in.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import torch

from contract.data_format import Example, load_examples
from contract.options import TrainingConfig

IGNORE_INDEX = -100  # labels value that the Hugging Face loss skips


# --- tokenization -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids and labels of one example. Labels are aligned with input_ids (not shifted: the loss shifts)
    and hold IGNORE_INDEX where nothing is trained."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool

    @property
    def n_target_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class TokenStats:
    """Token counts over a set of tokenized examples (lengths after truncation)."""

    n_examples: int
    n_tokens: int
    n_target_tokens: int
    mean_tokens: float
    p95_tokens: int
    max_tokens: int
    n_truncated: int
    n_without_targets: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def tokenize_example(tokenizer: Any, example: Example, *, max_seq_length: int, train_on_inputs: bool = False) -> TokenizedExample:
    """Tokenize one example. Targets are the assistant turns (with their end-of-turn tokens) of a chat, the
    completion plus EOS of a prompt/completion pair, or all of a plain text plus EOS; with `train_on_inputs`
    every token is a target except assistant turns with weight 0. The first token is never a target."""
    if max_seq_length < 1:
        raise ValueError(f"max_seq_length must be positive, got {max_seq_length}")
    if example.format == "chat":
        input_ids, is_target = _tokenize_chat(tokenizer, example, train_on_inputs)
    elif example.format == "prompt_completion":
        prompt_ids = _bos(tokenizer) + _encode(tokenizer, example.prompt or "")
        completion_ids = _with_eos(tokenizer, _encode(tokenizer, example.completion or ""))
        input_ids = prompt_ids + completion_ids
        is_target = [train_on_inputs] * len(prompt_ids) + [True] * len(completion_ids)
    elif example.format == "text":
        input_ids = _with_eos(tokenizer, _bos(tokenizer) + _encode(tokenizer, example.text or ""))
        is_target = [True] * len(input_ids)
    else:
        raise ValueError(f"unknown example format {example.format!r}")

    labels = [tok if target else IGNORE_INDEX for tok, target in zip(input_ids, is_target, strict=True)]
    if labels:
        # Nothing precedes the first token to predict it from. Masking it also makes a packed row train
        # exactly like separate rows: there, an example's first token would be "predicted" from the last
        # token of the example before it.
        labels[0] = IGNORE_INDEX
    truncated = len(input_ids) > max_seq_length
    return TokenizedExample(input_ids=input_ids[:max_seq_length], labels=labels[:max_seq_length], truncated=truncated)


def tokenize_examples(
    tokenizer: Any, examples: list[Example], *, max_seq_length: int, train_on_inputs: bool = False
) -> tuple[list[TokenizedExample], TokenStats]:
    """Tokenize every example and summarise the result."""
    tokenized = [tokenize_example(tokenizer, ex, max_seq_length=max_seq_length, train_on_inputs=train_on_inputs) for ex in examples]
    return tokenized, token_stats(tokenized)


def load_tokenized(path: Path, tokenizer: Any, cfg: TrainingConfig, *,
                   role: Literal["training", "validation"] = "training") -> tuple[list[TokenizedExample], TokenStats]:
    """The loader of the SFT formats: validate a JSONL file (contract.data_format raises DataValidationError with
    every fault) and tokenize its examples. A validation file needs one example, a training file the minimum."""
    examples = load_examples(path, min_examples=1, role=role) if role == "validation" else load_examples(path, role=role)
    return tokenize_examples(tokenizer, examples, max_seq_length=cfg.max_seq_length, train_on_inputs=cfg.train_on_inputs)


def load_tokenizer(base_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # Padding is masked out of the labels; if pad were the EOS token a careless mask would hide EOS too.
        # Our collators mask by position, not by token id, so any distinct id will do.
        tokenizer.pad_token_id = 0 if tokenizer.eos_token_id != 0 else 1
    return tokenizer


def token_stats(tokenized: list[TokenizedExample]) -> TokenStats:
    """Counts over tokenized examples; p95 is the nearest-rank 95th percentile of example lengths."""
    lengths = sorted(len(t.input_ids) for t in tokenized)
    n = len(lengths)
    return TokenStats(
        n_examples=n,
        n_tokens=sum(lengths),
        n_target_tokens=sum(t.n_target_tokens for t in tokenized),
        mean_tokens=sum(lengths) / n if n else 0.0,
        p95_tokens=lengths[math.ceil(0.95 * n) - 1] if n else 0,
        max_tokens=lengths[-1] if n else 0,
        n_truncated=sum(1 for t in tokenized if t.truncated),
        n_without_targets=sum(1 for t in tokenized if t.n_target_tokens == 0),
    )


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _bos(tokenizer: Any) -> list[int]:
    """[bos] if the tokenizer's own encoding starts with it (Llama does, SmolLM2 does not), else []."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    ids = tokenizer("a")["input_ids"]
    return [bos] if ids and ids[0] == bos else []


def _with_eos(tokenizer: Any, ids: list[int]) -> list[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; it is needed to teach the model where to stop")
    # A text that already ends in the EOS token (written out literally) must not get a second one.
    return ids if ids and ids[-1] == eos else ids + [eos]


def _render(tokenizer: Any, messages: list[dict[str, Any]], *, add_generation_prompt: bool = False) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    if not isinstance(text, str):
        raise ValueError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str")
    return text


def _assistant_start(tokenizer: Any, messages: list[dict[str, Any]], i: int) -> str:
    """The rendering up to where assistant message i's content begins."""
    if i > 0:
        return _render(tokenizer, messages[:i], add_generation_prompt=True)
    # Templates refuse an empty conversation, so for a leading assistant message find where its content
    # lands by rendering it with a marker in place of the content.
    marker = "\x00qlora-content-marker\x00"
    rendered = _render(tokenizer, [{**messages[0], "content": marker}])
    return rendered[: rendered.find(marker)] if marker in rendered else ""


def _tokenize_chat(tokenizer: Any, example: Example, train_on_inputs: bool) -> tuple[list[int], list[bool]]:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template, which chat examples need; use prompt/completion or text")
    assert example.messages is not None
    # The template sees role and content only; weight is ours.
    messages = [{"role": m["role"], "content": m["content"]} for m in example.messages]
    full = _render(tokenizer, messages)

    # Character spans [start, end) of each assistant turn: from where its content starts (the rendering of
    # the messages before it plus the generation prompt) to where the rendering of the conversation up to
    # and including it ends, so the end-of-turn tokens (EOS and what follows up to the next turn) are in it.
    trained: list[tuple[int, int]] = []
    skipped: list[tuple[int, int]] = []
    for i, message in enumerate(example.messages):
        if message["role"] != "assistant":
            continue
        head = _assistant_start(tokenizer, messages, i)
        upto = _render(tokenizer, messages[: i + 1])
        if not upto.startswith(head) or not full.startswith(upto):
            raise ValueError(
                f"line {example.line}: the tokenizer's chat template does not render conversation prefixes "
                f"consistently (message {i + 1}), so the assistant tokens cannot be located"
            )
        (trained if message.get("weight", 1) else skipped).append((len(head), len(upto)))

    try:
        encoding = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as exc:
        raise ValueError("chat examples need a fast tokenizer (one that returns offset mappings)") from exc
    input_ids = list(encoding["input_ids"])
    offsets = encoding["offset_mapping"]

    def overlaps(start: int, end: int, spans: list[tuple[int, int]]) -> bool:
        # A token that carries any character of a span counts as inside it, so that no assistant character
        # is left out of the loss when a token straddles the boundary.
        if end == start:
            return any(a <= start < b for a, b in spans)
        return any(start < b and end > a for a, b in spans)

    if train_on_inputs:
        is_target = [not overlaps(s, e, skipped) for s, e in offsets]
    else:
        is_target = [overlaps(s, e, trained) for s, e in offsets]
    return input_ids, is_target


# --- batching -----------------------------------------------------------------------------------------------


class Unit(Protocol):
    """A unit of training data (an example, a preference pair): the tokens it puts into a micro-batch."""

    @property
    def n_tokens(self) -> int: ...


U = TypeVar("U", bound=Unit)


def epoch_order(n_units: int, epoch: int, cfg: TrainingConfig) -> list[int]:
    """The unit order of an epoch: a function of (seed, epoch) only, so a resumed job sees the same order."""
    if not cfg.shuffle:
        return list(range(n_units))
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
    return torch.randperm(n_units, generator=generator).tolist()


def micro_batches(units: Sequence[U], cfg: TrainingConfig, size: int | None,
                  collate_units: Callable[[list[U]], dict[str, torch.Tensor]]) -> Iterator[dict[str, torch.Tensor]]:
    """The passes over `units`, each collated by `collate_units`: `size` units each, or with size=None the
    configured grouping: rows of at most micro_batch_tokens tokens (best fit, `pack_by_tokens`) if set, else
    micro_batch_size units."""
    if size is None and cfg.micro_batch_tokens is not None:
        for row in pack_by_tokens(list(units), cfg.micro_batch_tokens):
            yield collate_units(row)
        return
    size = size or cfg.micro_batch_size
    for start in range(0, len(units), size):
        yield collate_units(list(units[start : start + size]))


def collate(batch: list[TokenizedExample], cfg: TrainingConfig, pad_token_id: int) -> dict[str, torch.Tensor]:
    """A micro-batch of examples: one packed row with `packing`, else padded rows."""
    return collate_packed(batch) if cfg.packing else collate_padded(batch, pad_token_id)


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    """Tokens of a micro-batch that are predicted and trained on (the first token of a row never is)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Useful (non-pad) tokens in a micro-batch."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())


def pack_by_tokens(examples: list[U], budget: int) -> list[list[U]]:
    """Group examples into rows of at most `budget` tokens with as little room left as possible (best-fit
    decreasing: longest first, each into the fullest row it still fits, else a new row). Deterministic: equal
    lengths keep their order, so a resumed job builds the same rows. Every example must fit (`budget` >= its length).
    The more examples there are to choose from, the fuller the rows (docs/performance.md)."""
    rows: list[list[U]] = []
    by_room: list[tuple[int, int]] = []  # (room left, row index), sorted: the best fit is the first with room >= n
    for ex in sorted(examples, key=lambda e: -e.n_tokens):
        n = ex.n_tokens
        if n > budget:
            raise ValueError(f"an example of {n} tokens does not fit a row of {budget}")
        at = bisect.bisect_left(by_room, (n, -1))
        if at < len(by_room):
            left, row = by_room.pop(at)
            rows[row].append(ex)
            bisect.insort(by_room, (left - n, row))
        else:
            rows.append([ex])
            bisect.insort(by_room, (budget - n, len(rows) - 1))
    return rows


def collate_packed(batch: list[TokenizedExample]) -> dict[str, torch.Tensor]:
    """Padding-free packing: the micro-batch's examples concatenated into one row of shape [1, total_len].

    position_ids restart at 0 for each example. There is no attention_mask: transformers derives a
    block-diagonal causal mask from restarting position_ids (sdpa, eager, flex) and flash-attention uses them
    for variable-length attention, so no example attends to another.

    Call the model with ``use_cache=False`` (or set ``model.config.use_cache = False``): transformers 5 looks
    for packed sequences only when no KV cache is passed, and with ``use_cache=True`` the model makes one
    itself, even in training mode, so the examples of the row would silently attend to each other.
    """

    if not batch:
        raise ValueError("cannot collate an empty batch")
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    for ex in batch:
        input_ids.extend(ex.input_ids)
        labels.extend(ex.labels)
        position_ids.extend(range(len(ex.input_ids)))
    return {
        "input_ids": torch.tensor([input_ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([position_ids], dtype=torch.long),
    }


def collate_padded(batch: list[TokenizedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad the micro-batch to its longest example. Pads are masked out of attention and labels."""

    if not batch:
        raise ValueError("cannot collate an empty batch")
    length = max(len(ex.input_ids) for ex in batch)
    shape = (len(batch), length)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    for row, ex in enumerate(batch):
        n = len(ex.input_ids)
        input_ids[row, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(ex.labels, dtype=torch.long)
        attention_mask[row, :n] = 1
        position_ids[row, :n] = torch.arange(n, dtype=torch.long)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "position_ids": position_ids}
