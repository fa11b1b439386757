"""The preference shape of a training file (OpenAI's DPO format): what is accepted, every fault with its line."""

from __future__ import annotations

import pytest

from contract.data_format import MIN_EXAMPLES, DataValidationError, load_examples, validate_file
from tests.training.test_data import write_jsonl


def pair(prompt: str = "Hi?", good: str = "Hello!", bad: str = "Go away.", **input_extra) -> dict:
    return {"input": {"messages": [{"role": "user", "content": prompt}], **input_extra},
            "preferred_output": [{"role": "assistant", "content": good}],
            "non_preferred_output": [{"role": "assistant", "content": bad}]}


def test_openai_dpo_lines_are_accepted_with_tools_ignored(tmp_path):
    rows = [pair(f"q{i}") for i in range(MIN_EXAMPLES - 1)]
    rows.append(pair("weather?", tools=[{"type": "function", "function": {"name": "get_weather"}}], parallel_tool_calls=True))
    rows[0]["input"]["messages"].insert(0, {"role": "system", "content": "Be brief."})
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    report = validate_file(path)
    assert report.ok and report.kind == "preference" and report.formats == {"preference": MIN_EXAMPLES}
    examples = load_examples(path)
    assert examples[0].messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q0"}]
    assert (examples[0].preferred, examples[0].non_preferred) == ("Hello!", "Go away.")
    assert validate_file(write_jsonl(tmp_path / "s.jsonl", [{"text": "x"}] * MIN_EXAMPLES)).kind == "supervised"


def bad(**changes) -> dict:
    row = pair()
    for key, value in changes.items():
        if value is None:
            row.pop(key)
        else:
            row[key] = value
    return row


@pytest.mark.parametrize("row, expected", [
    (bad(non_preferred_output=None), "missing 'non_preferred_output'"),
    (bad(input=[]), "'input' must be an object"),
    (bad(input={"tools": []}), "'input' has no 'messages'"),
    (bad(input={"messages": [{"role": "user", "content": "x"}], "temperature": 1}), "'input' has unknown key(s) 'temperature'"),
    (bad(input={"messages": [{"role": "user", "content": "x"}], "tools": "all"}), "'input.tools' must be a list"),
    (bad(input={"messages": []}), "'input.messages' is empty"),
    (bad(input={"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}),
     "ends with an assistant message"),
    (bad(preferred_output=[{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]),
     "'preferred_output' must be a list of exactly one assistant message, got 2 messages"),
    (bad(preferred_output={"role": "assistant", "content": "a"}), "got an object"),
    (bad(non_preferred_output=[{"role": "user", "content": "a"}]), "holds a user message"),
    (bad(non_preferred_output=[{"role": "assistant", "content": "  "}]), "'non_preferred_output' has empty content"),
    (bad(preferred_output=[{"role": "assistant", "content": "a", "weight": 0}]), "has a weight"),
    ({**pair(), "messages": [{"role": "user", "content": "x"}]}, "mixes the keys of several example shapes"),
])
def test_each_preference_fault_names_its_line(tmp_path, row, expected):
    rows = [pair() for _ in range(MIN_EXAMPLES)]
    rows.insert(3, row)
    report = validate_file(write_jsonl(tmp_path / "p.jsonl", rows))
    assert report.n_faults == 1, report.faults
    assert report.faults[0].line == 4 and report.faults[0].code == "invalid_file_format"
    assert expected in report.faults[0].message, report.faults[0].message


def test_a_file_mixing_pairs_and_supervised_examples_is_refused(tmp_path):
    rows = [pair() for _ in range(MIN_EXAMPLES)] + [{"prompt": "a", "completion": "b"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(DataValidationError, match=r"mixes 10 preference pair\(s\) with 1 supervised example"):
        load_examples(path)


# --- tokenizing pairs ----------------------------------------------------------------------------------------

def example(prompt: str, good: str, bad_: str):
    from contract.data_format import Example

    return Example(line=1, format="preference", messages=[{"role": "user", "content": prompt}], preferred=good, non_preferred=bad_)


def answer_ids(tokenized) -> list[int]:
    return [label for label in tokenized.labels if label != -100]


def test_a_pair_is_two_chats_with_the_same_prompt(tokenizer):
    from contract.data_format import Example
    from worker.training.data import tokenize_example
    from worker.training.preference import tokenize_pair

    pair_ = tokenize_pair(tokenizer, example("Name a colour.", "Blue.", "I will not."), max_seq_length=512)
    alone = tokenize_example(tokenizer, Example(line=1, format="chat", messages=[
        {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]), max_seq_length=512)
    assert pair_.chosen == alone and not pair_.truncated
    start = pair_.chosen.labels.index(answer_ids(pair_.chosen)[0])
    assert pair_.chosen.input_ids[:start] == pair_.rejected.input_ids[:start]
    assert tokenizer.decode(answer_ids(pair_.rejected)).startswith("I will not.")


@pytest.mark.parametrize("prompt_words, answer_words, limit", [(200, 3, 64), (3, 200, 64), (200, 200, 64)])
def test_both_sides_are_truncated_the_same_way_prompt_first(tokenizer, prompt_words, answer_words, limit):
    from worker.training.preference import tokenize_pair

    prompt = " ".join(f"p{i}" for i in range(prompt_words))
    good = " ".join(f"g{i}" for i in range(answer_words))
    bad_ = " ".join(f"b{i}" for i in range(answer_words // 2 + 1))
    full = tokenize_pair(tokenizer, example(prompt, good, bad_), max_seq_length=100_000)
    cut = tokenize_pair(tokenizer, example(prompt, good, bad_), max_seq_length=limit)
    assert cut.truncated and max(len(cut.chosen.input_ids), len(cut.rejected.input_ids)) == limit
    for side_full, side_cut in ((full.chosen, cut.chosen), (full.rejected, cut.rejected)):
        assert len(side_cut.input_ids) <= limit and side_cut.labels[0] == -100
        assert side_cut.n_target_tokens > 0
        # The kept prompt is the end of the full prompt, and the same on both sides.
        kept_prompt = side_cut.labels.index(answer_ids(side_cut)[0])
        full_prompt = side_full.labels.index(answer_ids(side_full)[0])
        assert side_cut.input_ids[:kept_prompt] == side_full.input_ids[full_prompt - kept_prompt:full_prompt]
        # The answer is its own start.
        assert answer_ids(side_cut) == answer_ids(side_full)[:len(answer_ids(side_cut))]
    assert cut.chosen.input_ids[:5] == cut.rejected.input_ids[:5]
    if answer_words < limit // 4:  # a short answer is kept whole: the prompt gave way
        assert answer_ids(cut.chosen) == answer_ids(full.chosen)
    full_prompt = full.chosen.labels.index(answer_ids(full.chosen)[0])
    if full_prompt <= limit // 2:  # a prompt of at most half the limit is kept whole: the answers gave way
        assert cut.chosen.input_ids[:full_prompt] == full.chosen.input_ids[:full_prompt]
    else:  # else it keeps at least half the limit
        assert cut.chosen.labels.index(answer_ids(cut.chosen)[0]) >= limit // 2


def test_pairs_without_target_tokens_are_dropped_and_counted(tokenizer):
    from worker.training.preference import tokenize_pairs

    pairs, stats = tokenize_pairs(tokenizer, [example("a", "b", "c")] * 3, max_seq_length=1)
    assert pairs == [] and stats.n_dropped == 3
    pairs, stats = tokenize_pairs(tokenizer, [example("a", "b", "c")] * 3, max_seq_length=512)
    assert len(pairs) == 3 and stats.n_dropped == 0 and stats.n_pairs == 3


def test_a_micro_batch_holds_whole_pairs_chosen_rows_first(tokenizer):
    from worker.training.preference import collate_pairs, tokenize_pair

    pairs = [tokenize_pair(tokenizer, example(f"q{i}", "yes " * (i + 1), "no"), max_seq_length=512) for i in range(3)]
    batch = collate_pairs(pairs, pad_token_id=0)
    assert batch["input_ids"].shape[0] == 6
    for i, p in enumerate(pairs):
        assert batch["input_ids"][i, :len(p.chosen.input_ids)].tolist() == p.chosen.input_ids
        assert batch["input_ids"][3 + i, :len(p.rejected.input_ids)].tolist() == p.rejected.input_ids
