"""Write a lengths file: one token count per training example, as the engine would tokenize it.

    python bench/lengths/make_lengths.py DATA TOKENIZER_DIR OUT.txt [--merge-split] [--first-exchange] [--note "..."]...

DATA is either a JSONL of {"messages": [{"role": ..., "content": ...}, ...]} (the service's chat format) or a
ShareGPT-style JSON array of {"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}. A JSON
array cut off mid-record (a truncated download) is read up to its last whole record. With --merge-split, ShareGPT
records that a preprocessing step split into "<id>_<first message index>" chunks are joined back into whole
conversations (the last one is dropped if the array was cut, as it may be incomplete). Each length is
len(apply_chat_template(messages, tokenize=True)), untruncated. Conversations without an assistant message are
skipped (the service rejects them). With --first-exchange, each kept conversation is cut after its first
assistant message (a leading system message stays): single-turn examples, one prompt and one answer. The --note
lines, the counts and summary statistics go in '#' comments.
"""

import argparse
import json
import math
from pathlib import Path

ASSISTANT_NAMES = ("gpt", "chatgpt", "bing", "bard")  # the "from" values of assistant turns in ShareGPT dumps
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user"} | dict.fromkeys(ASSISTANT_NAMES, "assistant")


def read_records(path: Path) -> tuple[list[dict], bool]:
    """All records of a JSONL file or JSON array, and whether the array was cut off (only whole records kept)."""
    text = path.read_text(encoding="utf-8")
    if not text.lstrip().startswith("["):
        return [json.loads(line) for line in text.splitlines() if line.strip()], False
    decoder, records, i = json.JSONDecoder(), [], text.index("[") + 1
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text) or text[i] == "]":
            return records, False
        try:
            record, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return records, True
        records.append(record)


def merge_split(records: list[dict]) -> list[dict]:
    """Join consecutive records "<id>_<start>" into one conversation. A chunk may repeat the previous chunk's
    last message (its start is one before the previous end); that copy is checked and dropped."""
    merged: list[dict] = []
    for record in records:
        stem, _, start = record["id"].rpartition("_")
        if not merged or merged[-1]["id"] != stem:
            merged.append({"id": stem, "conversations": []})
        conversation = merged[-1]["conversations"]
        overlap = len(conversation) - int(start)
        chunk = record["conversations"]
        if not 0 <= overlap <= len(chunk) or (overlap and conversation[-overlap:] != chunk[:overlap]):
            raise ValueError(f"record {record['id']} does not continue the {len(conversation)} messages before it")
        conversation.extend(chunk[overlap:])
    return merged


def to_messages(record: dict) -> list[dict]:
    if "messages" in record:
        return [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    return [{"role": SHAREGPT_ROLES[m["from"]], "content": m["value"]} for m in record["conversations"]]


def first_exchange(messages: list[dict]) -> list[dict]:
    """The messages up to and including the first assistant message (all of them if there is none)."""
    roles = [m["role"] for m in messages]
    return messages[: roles.index("assistant") + 1] if "assistant" in roles else messages


def n_tokens(tokenizer, messages: list[dict]) -> int:
    ids = tokenizer.apply_chat_template(messages, tokenize=True)
    if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return len(ids)


def summary(lengths: list[int]) -> list[str]:
    s, n = sorted(lengths), len(lengths)

    def pct(p: float) -> int:  # nearest rank
        return s[max(0, math.ceil(p / 100 * n) - 1)]

    over = sum(1 for x in s if x > 2048)
    return [
        f"n={n} mean={sum(s) / n:.1f} median={pct(50)} p90={pct(90)} p99={pct(99)} min={s[0]} max={s[-1]}",
        f"above 2048: {over} ({100 * over / n:.1f}%); above 4096: {sum(1 for x in s if x > 4096)}; total tokens: {sum(s)}",
    ]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path)
    ap.add_argument("tokenizer_dir")
    ap.add_argument("out", type=Path)
    ap.add_argument("--merge-split", action="store_true", help="rejoin ShareGPT records split into <id>_<start> chunks")
    ap.add_argument("--first-exchange", action="store_true", help="keep each conversation up to its first assistant message")
    ap.add_argument("--note", action="append", default=[], help="a header line (source, licence, sampling); repeatable")
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_dir)
    records, cut = read_records(args.data)
    n_read = len(records)
    if args.merge_split:
        records = merge_split(records)[: -1 if cut else None]
    conversations = [m for m in map(to_messages, records) if any(x["role"] == "assistant" for x in m)]
    if args.first_exchange:
        conversations = [first_exchange(m) for m in conversations]
    lengths = [n_tokens(tokenizer, m) for m in conversations]
    header = [
        *args.note,
        f"records read: {n_read}{' (the whole records of a truncated JSON array)' if cut else ''}"
        + (f"; rejoined into {len(records)} conversations{' (last one dropped)' if cut else ''}" if args.merge_split else ""),
        f"skipped (no assistant message): {len(records) - len(conversations)}; kept: {len(conversations)}, in file order"
        + ("; each cut after its first assistant message (--first-exchange)" if args.first_exchange else ""),
        f"tokenizer: {args.tokenizer_dir} ({type(tokenizer).__name__})",
        "length = len(apply_chat_template(messages, tokenize=True)), untruncated",
        *summary(lengths),
    ]
    args.out.write_text("".join(f"# {line}\n" for line in header) + "".join(f"{x}\n" for x in lengths), encoding="utf-8")
    print("\n".join(header))


if __name__ == "__main__":
    main()
