"""bench/lengths/make_lengths.py: reading (truncated) ShareGPT arrays, rejoining split conversations, --first-exchange."""

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench" / "lengths"))

import make_lengths  # noqa: E402


def turn(who: str, text: str) -> dict:
    return {"from": who, "value": text}


def n_tokens(tokenizer, messages: list[dict]) -> int:
    ids = tokenizer.apply_chat_template(messages, tokenize=True)
    return len(ids["input_ids"] if hasattr(ids, "keys") else ids)


def run(tmp_path: Path, tokenizer, data: str, *flags: str) -> tuple[list[str], list[int]]:
    """make_lengths.main on DATA; the header lines and the lengths it writes."""
    src, out = tmp_path / "data.json", tmp_path / "out.txt"
    src.write_text(data, encoding="utf-8")
    make_lengths.main([str(src), tokenizer.name_or_path, str(out), "--note", "source: test", *flags])
    lines = out.read_text(encoding="utf-8").splitlines()
    return [x[2:] for x in lines if x.startswith("# ")], [int(x) for x in lines if not x.startswith("#")]


CONVERSATIONS = [
    {"id": "a", "conversations": [turn("human", "What is 2+2?"), turn("gpt", "4."), turn("human", "And 3+3?"), turn("gpt", "6.")]},
    {"id": "b", "conversations": [turn("human", "Hello?"), turn("human", "Anyone there?")]},  # no assistant: skipped
    {
        "id": "c",
        "conversations": [
            turn("system", "Answer briefly."),
            turn("human", "Name a colour."),
            turn("human", "Any colour."),
            turn("chatgpt", "Blue."),
            turn("human", "Another?"),
            turn("bard", "Red."),
        ],
    },
]


def test_first_exchange_keeps_messages_up_to_the_first_assistant_message(tmp_path, tokenizer):
    header, lengths = run(tmp_path, tokenizer, json.dumps(CONVERSATIONS), "--first-exchange")
    expected = [
        [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}],
        [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Name a colour."},
            {"role": "user", "content": "Any colour."},
            {"role": "assistant", "content": "Blue."},
        ],
    ]
    assert lengths == [n_tokens(tokenizer, m) for m in expected]
    assert header[0] == "source: test"
    assert "skipped (no assistant message): 1; kept: 2, in file order; each cut after its first assistant message" in header[2]


def test_without_first_exchange_whole_conversations_are_measured(tmp_path, tokenizer):
    header, lengths = run(tmp_path, tokenizer, json.dumps(CONVERSATIONS))
    whole = [make_lengths.to_messages(CONVERSATIONS[0]), make_lengths.to_messages(CONVERSATIONS[2])]
    assert whole[1][0] == {"role": "system", "content": "Answer briefly."} and whole[1][-1]["role"] == "assistant"
    assert lengths == [n_tokens(tokenizer, m) for m in whole]
    assert header[2] == "skipped (no assistant message): 1; kept: 2, in file order"


def test_first_exchange_of_messages():
    user, bot, system = ({"role": r, "content": r} for r in ("user", "assistant", "system"))
    assert make_lengths.first_exchange([system, user, bot, user, bot]) == [system, user, bot]
    assert make_lengths.first_exchange([bot, user, bot]) == [bot]
    assert make_lengths.first_exchange([user, user]) == [user, user]


SPLIT = [  # one conversation split into chunks "<id>_<first message index>"; the third repeats the boundary message
    {"id": "x_0", "conversations": [turn("human", "Q1"), turn("gpt", "A1")]},
    {"id": "x_2", "conversations": [turn("human", "Q2"), turn("gpt", "A2")]},
    {"id": "x_3", "conversations": [turn("gpt", "A2"), turn("human", "Q3"), turn("gpt", "A3")]},
    {"id": "y_0", "conversations": [turn("human", "only a question")]},
    {"id": "z_0", "conversations": [turn("human", "Z"), turn("gpt", "z")]},
]


def test_merge_split_rejoins_chunks_and_drops_the_repeated_message():
    merged = make_lengths.merge_split(SPLIT)
    assert [r["id"] for r in merged] == ["x", "y", "z"]
    assert [m["value"] for m in merged[0]["conversations"]] == ["Q1", "A1", "Q2", "A2", "Q3", "A3"]
    with pytest.raises(ValueError, match="does not continue"):
        make_lengths.merge_split([SPLIT[0], {"id": "x_1", "conversations": [turn("gpt", "not A1")]}])
    with pytest.raises(ValueError, match="does not continue"):
        make_lengths.merge_split([SPLIT[0], {"id": "x_5", "conversations": [turn("human", "a gap")]}])


def cut_array(records: list[dict]) -> str:
    """A JSON array cut off in the middle of its last record, as in the truncated ShareGPT download."""
    text = json.dumps(records, indent=1)
    return text[: text.rindex('"value"')]


def test_truncated_array_is_read_up_to_its_last_whole_record(tmp_path):
    path = tmp_path / "cut.json"
    path.write_text(cut_array(SPLIT), encoding="utf-8")
    assert make_lengths.read_records(path) == (SPLIT[:-1], True)
    path.write_text(json.dumps(SPLIT), encoding="utf-8")
    assert make_lengths.read_records(path) == (SPLIT, False)
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": str(i)}]}) + "\n" for i in range(3)))
    assert [r["messages"][0]["content"] for r in make_lengths.read_records(path)[0]] == ["0", "1", "2"]


def test_merge_split_of_a_truncated_array(tmp_path, tokenizer):
    # Cut inside z_0: x and y are whole; the last conversation read (y) may be incomplete, so it is dropped too
    records = SPLIT[:-1] + [{"id": "y_1", "conversations": [turn("gpt", "an answer")]}, SPLIT[-1]]
    header, lengths = run(tmp_path, tokenizer, cut_array(records), "--merge-split", "--first-exchange")
    assert header[1] == "records read: 5 (the whole records of a truncated JSON array); rejoined into 1 conversations (last one dropped)"
    q1 = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}]
    assert lengths == [n_tokens(tokenizer, q1)]
    header, lengths = run(tmp_path, tokenizer, json.dumps(SPLIT), "--merge-split")
    assert header[1] == "records read: 5; rejoined into 3 conversations"
    assert header[2] == "skipped (no assistant message): 1; kept: 2, in file order"
    whole_x = make_lengths.to_messages(make_lengths.merge_split(SPLIT[:3])[0])
    assert len(whole_x) == 6 and lengths[0] == n_tokens(tokenizer, whole_x)
