"""Tests of worker.training.data: file validation (every fault, with line and code), tokenization with loss
masks on the real SmolLM2 tokenizer, token statistics, and the two collate functions."""

from __future__ import annotations

import copy
import json
import tracemalloc
from pathlib import Path

import pytest
import torch

from contract.data_format import (
    MAX_LINE_BYTES,
    MAX_REPORTED_FAULTS,
    MIN_EXAMPLES,
    DataFault,
    DataValidationError,
    Example,
    load_examples,
    validate_file,
)
from worker.training.data import (
    IGNORE_INDEX,
    TokenizedExample,
    collate_packed,
    collate_padded,
    token_stats,
    tokenize_example,
    tokenize_examples,
)

EOS_ID = 2  # <|im_end|>
PAD_ID = 0  # <|endoftext|>

CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}


def write_jsonl(path: Path, rows: list) -> Path:
    """Each row is written as JSON unless it is already a str (a raw line) or bytes."""
    with open(path, "wb") as fh:
        for row in rows:
            if isinstance(row, bytes):
                fh.write(row + b"\n")
            elif isinstance(row, str):
                fh.write(row.encode() + b"\n")
            else:
                fh.write(json.dumps(row).encode() + b"\n")
    return path


def valid_rows(n: int = MIN_EXAMPLES) -> list:
    return [CHAT] * n


def targets(tokenized: TokenizedExample) -> list[int]:
    return [label for label in tokenized.labels if label != IGNORE_INDEX]


# --- validation ------------------------------------------------------------------------------------------


BAD_LINES = [
    pytest.param("{not json", "not valid JSON", id="not-json"),
    pytest.param("[1, 2]", "expected a JSON object, got an array", id="not-object"),
    pytest.param({"question": "q", "answer": "a"}, "expected an object with 'messages'", id="no-shape"),
    pytest.param({"text": "a", "prompt": "b", "completion": "c"}, "mixes the keys", id="two-shapes"),
    pytest.param({"text": "a", "source": "web"}, "unknown key(s) 'source'", id="unknown-top-level-key"),
    pytest.param({"messages": "hi"}, "'messages' must be a list", id="messages-not-list"),
    pytest.param({"messages": []}, "'messages' is empty", id="messages-empty"),
    pytest.param({"messages": ["hi"]}, "message 1 must be an object", id="message-not-object"),
    pytest.param({"messages": [{"content": "x"}]}, "message 1 has no 'role'", id="no-role"),
    pytest.param({"messages": [{"role": "user"}]}, "message 1 has no 'content'", id="no-content"),
    pytest.param(
        {"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]},
        "message 2 has unknown role 'bot' (expected system, user, assistant or tool)",
        id="unknown-role",
    ),
    pytest.param({"messages": [{"role": "assistant", "content": 5}]}, "message 1 content must be a string", id="content-number"),
    pytest.param({"messages": [{"role": "assistant", "content": None}]}, "got null", id="content-null"),
    pytest.param(
        {"messages": [{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        "content part 1 is not a text part",
        id="content-image-part",
    ),
    pytest.param({"messages": [{"role": "assistant", "content": "a", "score": 1}]}, "unknown key(s) 'score'", id="message-key"),
    pytest.param({"messages": [{"role": "assistant", "content": "a", "weight": 2}]}, "weight 2 (expected 0 or 1)", id="weight-2"),
    pytest.param({"messages": [{"role": "assistant", "content": "a", "weight": True}]}, "weight true", id="weight-bool"),
    pytest.param({"messages": [{"role": "assistant", "content": "a", "weight": 1.0}]}, "weight 1.0", id="weight-float"),
    pytest.param(
        {"messages": [{"role": "user", "content": "a", "weight": 0}, {"role": "assistant", "content": "b"}]},
        "only assistant messages take one",
        id="weight-on-user",
    ),
    pytest.param({"messages": [{"role": "user", "content": "a"}]}, "has no assistant message", id="no-assistant"),
    pytest.param(
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 0}]},
        "every assistant message has weight 0",
        id="all-weight-0",
    ),
    pytest.param({"prompt": "a"}, "missing 'completion'", id="no-completion"),
    pytest.param({"prompt": 1, "completion": "b"}, "'prompt' must be a string", id="prompt-not-string"),
    pytest.param({"prompt": "a", "completion": ""}, "'completion' is empty", id="completion-empty"),
    pytest.param({"text": ["a"]}, "'text' must be a string", id="text-not-string"),
    pytest.param({"text": "  "}, "'text' is empty", id="text-empty"),
]


@pytest.mark.parametrize(("row", "expected"), BAD_LINES)
def test_each_fault_names_its_line_and_code(tmp_path, row, expected):
    path = write_jsonl(tmp_path / "train.jsonl", valid_rows(2) + [row] + valid_rows(MIN_EXAMPLES))
    report = validate_file(path)
    assert not report.ok
    assert report.n_examples == MIN_EXAMPLES + 2
    assert report.n_faults == 1
    (fault,) = report.faults
    assert fault.line == 3
    assert fault.code == "invalid_file_format"
    assert fault.message.startswith("line 3: ")
    assert expected in fault.message


def test_all_faults_are_reported_not_just_the_first(tmp_path):
    rows = valid_rows(MIN_EXAMPLES) + ["nope", CHAT, {"text": 3}, "", {"messages": []}]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    report = validate_file(path)
    assert [(f.line, f.code) for f in report.faults] == [
        (11, "invalid_file_format"),
        (13, "invalid_file_format"),
        (15, "invalid_file_format"),
    ]
    assert report.n_faults == 3
    assert report.n_examples == MIN_EXAMPLES + 1

    with pytest.raises(DataValidationError) as info:
        load_examples(path)
    err = info.value
    assert err.faults == report.faults
    assert err.code == "invalid_file_format"
    assert "3 problems" in str(err) and "line 11" in str(err) and "line 15" in str(err)
    assert err.message == str(err)
    assert isinstance(err, ValueError)


def test_fault_list_is_capped_but_counted_and_keeps_the_whole_file_fault(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", ["x"] * (MAX_REPORTED_FAULTS + 50))
    report = validate_file(path)
    assert len(report.faults) == MAX_REPORTED_FAULTS
    assert report.n_faults == MAX_REPORTED_FAULTS + 50 + 1
    assert report.faults[-1].code == "invalid_n_examples"
    assert report.faults[-1].line is None
    assert report.faults[0].line == 1

    with pytest.raises(DataValidationError) as info:
        load_examples(path)
    assert len(info.value.faults) == MAX_REPORTED_FAULTS
    assert f"{MAX_REPORTED_FAULTS + 51} problems" in str(info.value)


def test_huge_single_line_is_a_fault_read_in_bounded_memory(tmp_path):
    path = tmp_path / "train.jsonl"
    with open(path, "wb") as fh:
        fh.write(b'{"text": "' + b"a" * (50 * 1024 * 1024) + b'"}\n')
        for row in valid_rows(MIN_EXAMPLES):
            fh.write(json.dumps(row).encode() + b"\n")
    tracemalloc.start()
    try:
        report = validate_file(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [f.to_dict() for f in report.faults] == [{"line": 1, "code": "invalid_file_format", "message": "line 1 is longer than 8 MiB"}]
    # The lines after the giant one are still read, with the right numbers.
    assert report.n_examples == MIN_EXAMPLES
    assert peak < 25 * 1024 * 1024, f"peak {peak / 2**20:.1f} MiB"


def test_line_length_limit_boundary(tmp_path):
    # A line of exactly MAX_LINE_BYTES (newline not counted) is allowed; one byte more is not.
    obj = b'{"text": "a"}'
    at_limit = obj + b" " * (MAX_LINE_BYTES - len(obj))
    path = write_jsonl(tmp_path / "ok.jsonl", [at_limit] + [json.dumps(CHAT).encode()] * MIN_EXAMPLES)
    report = validate_file(path)
    assert report.ok, report.faults
    assert report.formats == {"text": 1, "chat": MIN_EXAMPLES}

    path = write_jsonl(tmp_path / "long.jsonl", [at_limit + b" "] + [json.dumps(CHAT).encode()] * MIN_EXAMPLES)
    report = validate_file(path)
    assert [(f.line, f.message) for f in report.faults] == [(1, "line 1 is longer than 8 MiB")]


def test_huge_last_line_without_newline(tmp_path):
    path = tmp_path / "train.jsonl"
    with open(path, "wb") as fh:
        fh.write(b"".join(json.dumps(r).encode() + b"\n" for r in valid_rows(MIN_EXAMPLES)))
        fh.write(b"b" * (MAX_LINE_BYTES + 10))
    report = validate_file(path)
    assert [(f.line, f.message) for f in report.faults] == [(MIN_EXAMPLES + 1, f"line {MIN_EXAMPLES + 1} is longer than 8 MiB")]


def test_non_utf8_line(tmp_path):
    rows = [json.dumps(CHAT).encode()] * 2 + [b'{"text": "caf\xe9"}'] + [json.dumps(CHAT).encode()] * MIN_EXAMPLES
    report = validate_file(write_jsonl(tmp_path / "train.jsonl", rows))
    (fault,) = report.faults
    assert fault.line == 3
    assert fault.code == "invalid_file_format"
    assert fault.message.startswith("line 3 is not valid UTF-8")


@pytest.mark.parametrize("content", [b"", b"\n\n  \n", b"\xef\xbb\xbf", b"\xef\xbb\xbf\n\r\n"])
def test_empty_file_is_one_whole_file_fault(tmp_path, content):
    path = tmp_path / "train.jsonl"
    path.write_bytes(content)
    report = validate_file(path)
    assert report.n_examples == 0
    assert [(f.line, f.code) for f in report.faults] == [(None, "invalid_file_format")]
    assert "empty" in report.faults[0].message
    with pytest.raises(DataValidationError) as info:
        load_examples(path)
    assert info.value.code == "invalid_file_format"


def test_bom_and_crlf_and_blank_lines_are_tolerated(tmp_path):
    body = b"\r\n".join(json.dumps({"text": f"t{i}"}).encode() for i in range(MIN_EXAMPLES))
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + body.replace(b"\r\n", b"\r\n\r\n", 1) + b"\r\n\n")
    examples = load_examples(path)
    assert [e.text for e in examples] == [f"t{i}" for i in range(MIN_EXAMPLES)]
    # Blank lines are not examples but still count as lines.
    assert [e.line for e in examples[:3]] == [1, 3, 4]


def test_too_few_examples_message_matches_openai(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", valid_rows(3))
    report = validate_file(path)
    assert [f.to_dict() for f in report.faults] == [
        {"line": None, "code": "invalid_n_examples", "message": "Training file has 3 example(s), but must have at least 10 examples"}
    ]
    with pytest.raises(DataValidationError) as info:
        load_examples(path)
    assert info.value.code == "invalid_n_examples"
    assert len(load_examples(path, min_examples=3)) == 3


def test_invalid_lines_do_not_count_towards_the_minimum(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", valid_rows(MIN_EXAMPLES - 1) + ["oops"])
    report = validate_file(path)
    assert [f.code for f in report.faults] == ["invalid_file_format", "invalid_n_examples"]
    assert report.faults[1].message == "Training file has 9 example(s), but must have at least 10 examples"
    # The first fault decides the error's code.
    with pytest.raises(DataValidationError) as info:
        load_examples(path)
    assert info.value.code == "invalid_file_format"


def test_all_three_shapes_mixed_in_one_file(tmp_path):
    rows = [
        {
            "id": "a1",
            "metadata": {"src": "x"},
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi", "name": "ann"},
                {"role": "assistant", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}], "weight": 1},
                {"role": "tool", "content": "{}", "tool_call_id": "c1"},
                {"role": "assistant", "content": "again", "weight": 0, "tool_calls": []},
            ],
        },
        {"prompt": "2+2=", "completion": " 4", "id": 7},
        {"text": "plain text"},
    ] + valid_rows(MIN_EXAMPLES - 3)
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    report = validate_file(path)
    assert report.ok and report.n_faults == 0
    assert report.formats == {"chat": MIN_EXAMPLES - 2, "prompt_completion": 1, "text": 1}

    chat, pc, text = load_examples(path)[:3]
    assert chat == Example(
        line=1,
        format="chat",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello", "weight": 1},
            {"role": "tool", "content": "{}"},
            {"role": "assistant", "content": "again", "weight": 0},
        ],
    )
    assert pc == Example(line=2, format="prompt_completion", prompt="2+2=", completion=" 4")
    assert text == Example(line=3, format="text", text="plain text")


def test_validate_file_missing_file_raises_oserror(tmp_path):
    with pytest.raises(OSError):
        validate_file(tmp_path / "missing.jsonl")


def test_data_fault_to_dict():
    assert DataFault(line=4, code="invalid_file_format", message="line 4: x").to_dict() == {
        "line": 4,
        "code": "invalid_file_format",
        "message": "line 4: x",
    }


# --- tokenization ----------------------------------------------------------------------------------------


def chat(*messages: dict) -> Example:
    return Example(line=1, format="chat", messages=list(messages))


CONVERSATION = chat(
    {"role": "system", "content": "Be nice."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello there!"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Goodbye."},
)


def test_chat_trains_on_assistant_content_and_turn_end_only(tokenizer):
    tok = tokenize_example(tokenizer, CONVERSATION, max_seq_length=512)
    assert len(tok.labels) == len(tok.input_ids)
    assert tokenizer.decode(targets(tok)) == "Hello there!<|im_end|>\nGoodbye.<|im_end|>\n"
    # Labels are the input ids themselves (not shifted), -100 elsewhere.
    assert all(label in (IGNORE_INDEX, token) for label, token in zip(tok.labels, tok.input_ids, strict=True))
    assert targets(tok).count(EOS_ID) == 2
    # The pad token is not the EOS: it is neither in the sequence nor in the labels.
    assert tokenizer.pad_token_id == PAD_ID != tokenizer.eos_token_id
    assert PAD_ID not in tok.input_ids and PAD_ID not in tok.labels
    # The ids are exactly the template's rendering, tokenized once.
    rendered = tokenizer.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in CONVERSATION.messages], tokenize=False)
    assert tok.input_ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert not tok.truncated


def test_chat_default_system_prompt_and_user_turns_are_not_trained(tokenizer):
    # SmolLM2's template inserts a default system prompt when there is none; it must stay out of the loss.
    tok = tokenize_example(tokenizer, chat({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}), max_seq_length=512)
    assert "SmolLM" in tokenizer.decode(tok.input_ids)
    assert tokenizer.decode(targets(tok)) == "Yo<|im_end|>\n"


def test_chat_leading_assistant_message(tokenizer):
    ex = chat({"role": "assistant", "content": "I start."}, {"role": "user", "content": "ok"})
    tok = tokenize_example(tokenizer, ex, max_seq_length=512)
    assert tokenizer.decode(targets(tok)) == "I start.<|im_end|>\n"


def test_weight_zero_messages_are_not_trained(tokenizer):
    ex = chat(
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Bad answer.", "weight": 0},
        {"role": "user", "content": "Again"},
        {"role": "assistant", "content": "Good answer.", "weight": 1},
    )
    tok = tokenize_example(tokenizer, ex, max_seq_length=512)
    assert tokenizer.decode(targets(tok)) == "Good answer.<|im_end|>\n"
    # Even with train_on_inputs, an assistant turn marked weight 0 stays out of the loss.
    everything = tokenize_example(tokenizer, ex, max_seq_length=512, train_on_inputs=True)
    decoded = tokenizer.decode(targets(everything))
    assert "Bad answer." not in decoded
    assert "Again" in decoded and "Good answer." in decoded


def test_train_on_inputs_trains_every_token_but_the_first(tokenizer):
    examples = [
        CONVERSATION,
        Example(line=2, format="prompt_completion", prompt="Q: 2+2?\nA:", completion=" 4"),
        Example(line=3, format="text", text="Just text."),
    ]
    for ex in examples:
        tok = tokenize_example(tokenizer, ex, max_seq_length=512, train_on_inputs=True)
        assert tok.labels[0] == IGNORE_INDEX
        assert tok.labels[1:] == tok.input_ids[1:]
        assert tok.n_target_tokens == len(tok.input_ids) - 1


def test_prompt_completion_trains_on_completion_and_eos(tokenizer):
    ex = Example(line=1, format="prompt_completion", prompt="Q: capital of France?\nA:", completion=" Paris")
    tok = tokenize_example(tokenizer, ex, max_seq_length=512)
    prompt_ids = tokenizer("Q: capital of France?\nA:", add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(" Paris", add_special_tokens=False)["input_ids"]
    # SmolLM2's own encoding adds no BOS, so none is prepended.
    assert tok.input_ids == prompt_ids + completion_ids + [EOS_ID]
    assert tok.labels == [IGNORE_INDEX] * len(prompt_ids) + completion_ids + [EOS_ID]


def test_text_trains_on_everything_but_the_first_token(tokenizer):
    tok = tokenize_example(tokenizer, Example(line=1, format="text", text="hello world"), max_seq_length=512)
    ids = tokenizer("hello world", add_special_tokens=False)["input_ids"]
    assert tok.input_ids == ids + [EOS_ID]
    assert tok.labels == [IGNORE_INDEX] + ids[1:] + [EOS_ID]


def test_bos_is_prepended_when_the_tokenizer_adds_one(tokenizer):
    class BosTokenizer:
        """A Llama-like tokenizer: its normal encoding starts with BOS (id 1)."""

        bos_token_id = 1
        eos_token_id = EOS_ID

        def __call__(self, text, add_special_tokens=True):
            ids = [ord(c) + 10 for c in text]
            return {"input_ids": ([1] if add_special_tokens else []) + ids}

    tok = tokenize_example(BosTokenizer(), Example(line=1, format="prompt_completion", prompt="ab", completion="c"), max_seq_length=64)
    assert tok.input_ids == [1, 107, 108, 109, EOS_ID]
    assert tok.labels == [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 109, EOS_ID]


def test_truncation_keeps_the_start_and_is_counted(tokenizer):
    long_answer = chat({"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": "Once upon a time " * 20})
    short = Example(line=2, format="text", text="short")
    tokenized, stats = tokenize_examples(tokenizer, [long_answer, short], max_seq_length=16)
    full = tokenize_example(tokenizer, long_answer, max_seq_length=4096)
    cut = tokenized[0]
    assert cut.truncated and len(cut.input_ids) == 16 == len(cut.labels)
    assert cut.input_ids == full.input_ids[:16] and cut.labels == full.labels[:16]
    assert not tokenized[1].truncated
    assert stats.n_truncated == 1
    # 16 tokens hold the default system prompt and the question but none of the answer.
    assert cut.n_target_tokens == 0
    assert stats.n_without_targets == 1
    assert stats.n_examples == 2
    assert stats.max_tokens == 16


def test_chat_needs_a_chat_template(tokenizer):
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        tokenize_example(bare, CONVERSATION, max_seq_length=512)
    # The other shapes do not need one.
    tok = tokenize_example(bare, Example(line=1, format="text", text="hi"), max_seq_length=512)
    assert tok.input_ids[-1] == EOS_ID


def test_inconsistent_chat_template_is_rejected(tokenizer):
    odd = copy.deepcopy(tokenizer)
    # The rendering starts with the number of messages, so a shorter conversation is not a prefix of a longer one.
    odd.chat_template = (
        "{{ messages|length }}\n{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(ValueError, match="does not render conversation prefixes consistently"):
        tokenize_example(odd, CONVERSATION, max_seq_length=512)


# --- statistics ------------------------------------------------------------------------------------------


def made(length: int, n_targets: int, truncated: bool = False) -> TokenizedExample:
    labels = [IGNORE_INDEX] * (length - n_targets) + list(range(5, 5 + n_targets))
    return TokenizedExample(input_ids=list(range(5, 5 + length)), labels=labels, truncated=truncated)


def test_token_stats_on_a_hand_made_set():
    batch = [made(n, min(n - 1, 3), truncated=n == 20) for n in range(1, 21)]
    batch[4] = made(5, 0)
    stats = token_stats(batch)
    assert stats.n_examples == 20
    assert stats.n_tokens == 210
    assert stats.mean_tokens == 10.5
    assert stats.p95_tokens == 19  # nearest rank: ceil(0.95 * 20) = 19th smallest
    assert stats.max_tokens == 20
    assert stats.n_truncated == 1
    assert stats.n_target_tokens == sum(min(n - 1, 3) for n in range(1, 21)) - 3
    assert stats.n_without_targets == 2  # the 1-token example and the one made with none
    assert stats.to_dict()["p95_tokens"] == 19
    assert set(stats.to_dict()) == {
        "n_examples",
        "n_tokens",
        "n_target_tokens",
        "mean_tokens",
        "p95_tokens",
        "max_tokens",
        "n_truncated",
        "n_without_targets",
    }


def test_token_stats_small_and_empty_sets():
    assert token_stats([made(7, 2), made(3, 1)]).p95_tokens == 7
    empty = token_stats([])
    assert (empty.n_examples, empty.n_tokens, empty.mean_tokens, empty.p95_tokens, empty.max_tokens) == (0, 0, 0.0, 0, 0)


# --- batching --------------------------------------------------------------------------------------------


def test_collate_packed_one_row_with_restarting_positions():
    batch = [made(3, 2), made(5, 1), made(1, 0)]
    out = collate_packed(batch)
    assert set(out) == {"input_ids", "labels", "position_ids"}
    for tensor in out.values():
        assert tensor.dtype == torch.long
        assert tensor.shape == (1, 9)
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 0]]
    assert out["input_ids"].tolist() == [sum((ex.input_ids for ex in batch), [])]
    assert out["labels"].tolist() == [sum((ex.labels for ex in batch), [])]


def test_collate_padded_masks_pads():
    batch = [made(3, 2), made(5, 1)]
    out = collate_padded(batch, pad_token_id=PAD_ID)
    for tensor in out.values():
        assert tensor.dtype == torch.long
        assert tensor.shape == (2, 5)
    assert out["input_ids"].tolist() == [[5, 6, 7, PAD_ID, PAD_ID], [5, 6, 7, 8, 9]]
    assert out["labels"].tolist() == [[IGNORE_INDEX, 5, 6, IGNORE_INDEX, IGNORE_INDEX], [IGNORE_INDEX] * 4 + [5]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 0], [0, 1, 2, 3, 4]]


def test_collate_rejects_an_empty_batch():
    with pytest.raises(ValueError):
        collate_packed([])
    with pytest.raises(ValueError):
        collate_padded([], pad_token_id=PAD_ID)


def test_packed_row_trains_like_separate_rows(tokenizer, tiny_model_dir):
    """The contract with the training loop: a packed row, run with use_cache=False, gives each example the
    same logits and the whole batch the same loss as running the examples one by one (no cross-attention)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    examples = [
        CONVERSATION,
        Example(line=2, format="prompt_completion", prompt="2+2=", completion=" 4"),
        Example(line=3, format="text", text="the cat sat on the mat"),
    ]
    tokenized, stats = tokenize_examples(tokenizer, examples, max_seq_length=512)
    with torch.no_grad():
        packed = model(**collate_packed(tokenized), use_cache=False)
        separate = [model(input_ids=torch.tensor([t.input_ids]), labels=torch.tensor([t.labels]), use_cache=False) for t in tokenized]
    torch.testing.assert_close(packed.logits[0], torch.cat([s.logits[0] for s in separate]), atol=1e-4, rtol=1e-4)
    # Every label of a packed row is predicted from its own example only, so the token-weighted mean matches.
    expected = sum(s.loss * t.n_target_tokens for s, t in zip(separate, tokenized, strict=True)) / stats.n_target_tokens
    torch.testing.assert_close(packed.loss, expected, atol=1e-5, rtol=1e-5)


def test_a_validation_file_is_named_as_such(tmp_path):
    path = tmp_path / "valid.jsonl"
    path.write_text("not json\n")
    with pytest.raises(DataValidationError) as err:
        load_examples(path, min_examples=1, role="validation")
    assert err.value.role == "validation"
    assert err.value.message.startswith("Validation file has 2 problems: line 1")
    (tmp_path / "empty.jsonl").write_text("")
    assert validate_file(tmp_path / "empty.jsonl", role="validation").faults[0].message == "Validation file is empty"


def test_pack_by_tokens_best_fit_decreasing():
    from worker.training.data import TokenizedExample, pack_by_tokens

    def ex(n, tag=0):
        return TokenizedExample(input_ids=[tag] * n, labels=[tag] * n, truncated=False)

    examples = [ex(n, i) for i, n in enumerate([3, 9, 4, 6, 2, 5, 1])]
    rows = pack_by_tokens(examples, 10)
    assert [[len(e.input_ids) for e in row] for row in rows] == [[9, 1], [6, 4], [5, 3, 2]]
    assert sorted(e.input_ids[0] for row in rows for e in row) == list(range(7))  # each example once
    assert pack_by_tokens(examples, 10) == rows  # deterministic
    ties = [ex(5, i) for i in range(4)]
    assert [[e.input_ids[0] for e in row] for row in pack_by_tokens(ties, 10)] == [[0, 1], [2, 3]]  # equal lengths keep their order
    assert pack_by_tokens([], 10) == []
    with pytest.raises(ValueError, match="11 tokens does not fit a row of 10"):
        pack_by_tokens([ex(11)], 10)


def test_fault_messages_quote_hostile_content_only_in_part(tmp_path):
    """Keys and roles of megabytes are quoted by a few hundred characters at most, so that the faults of a hostile
    file stay small wherever they are shown (status_details, the job's error)."""
    from contract.data_format import MAX_FAULT_MESSAGE_CHARS

    huge = "k" * 1_000_000
    rows = [{huge: 1}, {"messages": [{"role": huge, "content": "x"}]}, {"text": "ok", **{f"{huge[:1000]}{i}": 1 for i in range(500)}}]
    path = write_jsonl(tmp_path / "train.jsonl", [json.dumps(r) for r in rows * 40])
    report = validate_file(path)
    assert report.n_faults == 121 and len(report.faults) == MAX_REPORTED_FAULTS
    for fault in report.faults:
        assert len(fault.message) <= len("line 120: ") + MAX_FAULT_MESSAGE_CHARS, len(fault.message)
    assert sum(len(f.message) for f in report.faults) < 40_000
    assert "unknown role 'kkk" in report.faults[1].message and "chars)" in report.faults[1].message
