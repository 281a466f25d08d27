"""Readers: exact counts on the real files, the prompt/response split, the Taskmaster text format, errors."""

import gzip
import json
import logging
import os

import pytest

from pe_rlhf.data import sources
from pe_rlhf.data.examples import DataError, LabeledExample, PreferenceExample, Prompt, PromptResponse


@pytest.fixture(scope="module")
def hh(shared_data):
    return sources.read_hh_harmless(os.path.join(shared_data, sources.HH_HARMLESS))


@pytest.fixture(scope="module")
def coffee(shared_data):
    return sources.read_taskmaster(os.path.join(shared_data, sources.TASKMASTER_COFFEE))


@pytest.fixture(scope="module")
def ticketing(shared_data):
    return sources.read_taskmaster(os.path.join(shared_data, sources.TASKMASTER_TICKETING))


def _write(path, lines):
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


# ---------------------------------------------------------------------------- real data


def test_hh_counts_and_split_rebuild_both_dialogues(hh, shared_data):
    assert len(hh) == 1800 and hh.skipped_identical == 0
    raw = [json.loads(line) for line in gzip.open(os.path.join(shared_data, sources.HH_HARMLESS), "rt")]
    for e, row in zip(hh.examples, raw):
        assert e.prompt + e.chosen == row["chosen"] and e.prompt + e.rejected == row["rejected"]
        assert e.prompt.endswith("\n\nAssistant:") and e.margin == 0.0
    # the plain rule (split each dialogue at its own last marker) gives the same prompt for 1,798
    # pairs; the 2 where it does not are pairs whose chosen reply contains "\n\nAssistant:" itself
    naive = [r["chosen"][:r["chosen"].rfind("\n\nAssistant:") + 12] == e.prompt for e, r in zip(hh.examples, raw)]
    assert naive.count(False) == 2 and [i for i, ok in enumerate(naive) if not ok] == [1254, 1688]
    drag = hh.examples[1254]
    assert drag.prompt.endswith("Human: Isn't that drag kings?\n\nAssistant:")
    assert drag.rejected == (" A drag king is the opposite of a drag queen, like a male who acts like a "
                             "stereotypical woman.")


def test_hh_sft_and_prompts(hh):
    sft = sources.sft_from_preferences(hh.examples)
    assert len(sft) == 1800 and sft[3] == PromptResponse(hh.examples[3].prompt, hh.examples[3].chosen)
    prompts = sources.prompts_of(hh.examples)
    assert len(prompts) == len({e.prompt for e in hh.examples}) and prompts[0] == hh.examples[0].prompt


def test_taskmaster_counts(coffee, ticketing):
    assert len(coffee) == 3228 and sum(e.label == 1.0 for e in coffee.examples) == 2775
    assert len(ticketing) == 3500 and sum(e.label == 1.0 for e in ticketing.examples) == 552
    assert {e.label for e in coffee.examples + ticketing.examples} == {0.0, 1.0}
    assert len(sources.sft_from_labeled(coffee.examples)) == 2775
    assert len(sources.sft_from_labeled(ticketing.examples)) == 552


def test_taskmaster_rendering_of_the_first_coffee_example(coffee):
    first = coffee.examples[0]  # reward_00.json, example 0: an espresso order, good API call
    assert first == LabeledExample(
        prompt="Agent: Welcome to the Coffee Bar where you can order coffee, tea, espresso, and other drinks "
               "ahead of time. What can I get for you?\nUser: can i get an espresso please\nAgent:",
        response=' API call: {"get_menu_items": {"query": "espresso"}}',
        label=1.0,
    )


def test_taskmaster_render_all_roles():
    context = [
        {"role": "agent", "text": "Hi.\nWhat now?"},
        {"role": "user", "text": "one latte"},
        {"role": "agent", "api": {"find": {"q": "latté", "n": 2}}},
        {"role": "api", "response": {"find": {"ids": ["x1"]}}},
    ]
    prompt, response = sources.render_taskmaster(context, {"role": "agent", "text": "Done."})
    assert prompt == ('Agent: Hi. What now?\nUser: one latte\nAgent: API call: {"find": {"q": "latté", "n": 2}}\n'
                      'API response: {"find": {"ids": ["x1"]}}\nAgent:')
    assert response == " Done."
    assert sources.render_taskmaster([], {"role": "agent", "text": "Hello"}) == ("Agent:", " Hello")


# ---------------------------------------------------------------------------- generic JSONL


def test_generic_jsonl_readers(tmp_path):
    pref = _write(tmp_path / "p.jsonl", [json.dumps({"prompt": "P", "chosen": "A", "rejected": "B", "margin": 2}),
                                         "", json.dumps({"prompt": "Q", "chosen": "C", "rejected": "D", "x": 1})])
    assert sources.read_preference_jsonl(pref).examples == (PreferenceExample("P", "A", "B", 2.0),
                                                            PreferenceExample("Q", "C", "D", 0.0))
    lab = tmp_path / "l.jsonl.gz"
    with gzip.open(lab, "wt") as f:
        f.write(json.dumps({"prompt": "P", "response": "R", "label": 0}) + "\n")
    assert sources.read_labeled_jsonl(str(lab)).examples == (LabeledExample("P", "R", 0.0),)
    sft = _write(tmp_path / "s.jsonl", [json.dumps({"prompt": "P", "response": "R"})])
    assert sources.read_sft_jsonl(sft).examples == (PromptResponse("P", "R"),)
    prompts = _write(tmp_path / "q.jsonl", [json.dumps({"prompt": "P"}), json.dumps({"prompt": "Q", "response": "R"})])
    assert sources.read_prompts_jsonl(prompts).examples == (Prompt("P"), Prompt("Q"))
    bad = _write(tmp_path / "b.jsonl", [json.dumps({"prompt": "P"}), json.dumps({"text": "Q"})])
    with pytest.raises(DataError, match=f"^{bad}:2: missing field 'prompt' \\(fields present: text\\)"):
        sources.read_prompts_jsonl(bad)


def test_identical_pairs_are_counted_skipped_and_logged(tmp_path, caplog):
    path = _write(tmp_path / "p.jsonl", [json.dumps({"prompt": "P", "chosen": c, "rejected": r})
                                         for c, r in [("A", "B"), ("same", "same"), ("C", "D"), ("x", "x")]])
    with caplog.at_level(logging.WARNING):
        loaded = sources.read_preference_jsonl(path)
    assert len(loaded) == 2 and loaded.skipped_identical == 2
    assert [e.chosen for e in loaded.examples] == ["A", "C"]
    assert "2 pairs skipped (chosen == rejected)" in caplog.text and path in caplog.text
    hh = tmp_path / "hh.jsonl"
    _write(hh, [json.dumps({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: a"}),
                json.dumps({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"})])
    loaded = sources.read_hh_harmless(str(hh))
    assert loaded.skipped_identical == 1
    assert loaded.examples == (PreferenceExample("\n\nHuman: q\n\nAssistant:", " a", " b"),)


def test_a_line_over_the_byte_limit_is_skipped_unread_named_and_counted(tmp_path, caplog):
    """One 20 MB line once took 69 s and 7.8 GB; now it is passed over in 1 MiB reads and reported."""
    import tracemalloc

    path = tmp_path / "sft.jsonl"
    huge = json.dumps({"prompt": "x" * 20_000_000, "response": "y"})
    with open(path, "w") as f:
        f.write(json.dumps({"prompt": "P", "response": "R"}) + "\n" + huge + "\n")
        f.write(json.dumps({"prompt": "Q", "response": "S"}) + "\n")
    del huge
    tracemalloc.start()
    with caplog.at_level(logging.WARNING):
        loaded = sources.read_sft_jsonl(str(path))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert loaded.examples == (PromptResponse("P", "R"), PromptResponse("Q", "S"))
    assert loaded.skipped_long == 1
    assert f"{path}:2: skipped a line of 20000031 bytes, over the 1048576-byte limit" in caplog.text
    assert f"{path}: 2 examples, 1 lines skipped (over the byte limit)" in caplog.text
    assert peak < 4 * sources.MAX_LINE_BYTES  # the 20 MB line was never held
    # The limit is the reader's to set: a line of exactly max_line_bytes (newline excluded) is read.
    line = json.dumps({"prompt": "P", "response": "R"})
    assert sources.read_sft_jsonl(str(path), max_line_bytes=len(line)).skipped_long == 1
    only = _write(tmp_path / "only.jsonl", [json.dumps({"prompt": "p" * 100, "response": "r"})])
    with pytest.raises(DataError, match=f"^{only}: no usable examples \\(all 1 lines are over the byte "
                                        "limit\\)$"):
        sources.read_sft_jsonl(only, max_line_bytes=50)


# ---------------------------------------------------------------------------- errors


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = _write(tmp_path / "p.jsonl", [json.dumps({"prompt": "P", "chosen": "A", "rejected": "B"}),
                                         json.dumps({"prompt": "P", "chosen": "A", "rejected": "C"}),
                                         '{"prompt": "P", "chosen": '])
    with pytest.raises(DataError, match=f"^{path}:3: malformed JSON"):
        sources.read_preference_jsonl(path)


def test_missing_field_names_file_line_and_field(tmp_path):
    path = _write(tmp_path / "p.jsonl", [json.dumps({"prompt": "P", "chosen": "A", "rejected": "B"}),
                                         json.dumps({"prompt": "P", "chosen": "A"})])
    with pytest.raises(DataError, match=f"^{path}:2: missing field 'rejected' \\(fields present: chosen, prompt\\)"):
        sources.read_preference_jsonl(path)
    path = _write(tmp_path / "l.jsonl", [json.dumps({"prompt": "P", "response": "R", "label": "good"})])
    with pytest.raises(DataError, match=f"^{path}:1: field 'label' must be a finite number, got 'good'"):
        sources.read_labeled_jsonl(path)
    path = _write(tmp_path / "s.jsonl", [json.dumps({"prompt": "P", "response": 3})])
    with pytest.raises(DataError, match=f"^{path}:1: field 'response' must be a string, got int"):
        sources.read_sft_jsonl(path)


def test_a_label_outside_0_1_names_file_line_and_field(tmp_path):
    path = _write(tmp_path / "l.jsonl", [json.dumps({"prompt": "P", "response": "R", "label": 1}),
                                         json.dumps({"prompt": "P", "response": "R", "label": 0.25}),
                                         json.dumps({"prompt": "P", "response": "R", "label": 5})])
    with pytest.raises(DataError, match=f"^{path}:3: field 'label' must be a label in \\[0, 1\\] \\(0 bad, 1 good, "
                                        "or a soft label between them.*got 5$"):
        sources.read_labeled_jsonl(path)
    path = _write(tmp_path / "soft.jsonl", [json.dumps({"prompt": "P", "response": "R", "label": 0.25}),
                                            json.dumps({"prompt": "P", "response": "R", "label": 0})])
    assert [e.label for e in sources.read_labeled_jsonl(path).examples] == [0.25, 0.0]
    file = tmp_path / "reward_00.json"
    file.write_text(json.dumps([{"conversation_id": "c0", "context": "[]", "reward": -1,
                                 "generation": '{"role": "agent", "text": "hi"}'}]))
    with pytest.raises(DataError, match=f"^{file}: example 0 \\(c0\\): field 'reward' must be a label in"):
        sources.read_taskmaster(str(file))


def test_named_dataset_limit_must_keep_at_least_one_example(tmp_path):
    from pe_rlhf.data.named import named_dataset

    for limit in (-5, 0, 2.5, True):
        with pytest.raises(ValueError, match=f"^named_dataset.limit={limit!r}: expected an integer >= 1"):
            named_dataset("hh_harmless", data_dir=str(tmp_path), limit=limit)  # before any file is read


def test_empty_dataset_names_the_file(tmp_path):
    path = _write(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(DataError, match=f"^{path}: no examples \\(the file is empty\\)"):
        sources.read_sft_jsonl(path)
    path = _write(tmp_path / "same.jsonl", [json.dumps({"prompt": "P", "chosen": "A", "rejected": "A"})])
    with pytest.raises(DataError, match=f"^{path}: no usable examples \\(all 1 pairs have chosen == rejected\\)"):
        sources.read_preference_jsonl(path)
    with pytest.raises(FileNotFoundError, match="nope.jsonl: no such file"):
        sources.read_sft_jsonl(str(tmp_path / "nope.jsonl"))


def test_hh_pair_without_shared_assistant_turn(tmp_path):
    path = _write(tmp_path / "hh.jsonl", [json.dumps({"chosen": "\n\nHuman: a\n\nAssistant: x",
                                                      "rejected": "\n\nHuman: b\n\nAssistant: x"})])
    with pytest.raises(DataError, match=f"^{path}:1: chosen and rejected share no prefix ending in"):
        sources.read_hh_harmless(path)


def test_taskmaster_errors_name_file_example_and_field(tmp_path):
    good = {"conversation_id": "c0", "context": "[]", "generation": '{"role": "agent", "text": "hi"}',
            "reward": 1.0}
    file = tmp_path / "reward_00.json"
    file.write_text(json.dumps([good, {"conversation_id": "c1", "context": "[]", "reward": 0.0}]))
    with pytest.raises(DataError, match=f"^{file}: example 1 \\(c1\\): missing field 'generation'"):
        sources.read_taskmaster(str(tmp_path))
    file.write_text(json.dumps([good, dict(good, context='[{"role": "user", "text": "x"')]))
    with pytest.raises(DataError, match=f"^{file}: example 1 \\(c0\\): field 'context' is not valid JSON"):
        sources.read_taskmaster(str(file))
    file.write_text(json.dumps([dict(good, context='[{"role": "robot", "text": "x"}]')]))
    with pytest.raises(DataError, match="example 0 \\(c0\\), context turn 0: unknown role 'robot'"):
        sources.read_taskmaster(str(file))
    file.write_text("[\n" + json.dumps(good) + ",\n{oops}\n]")
    with pytest.raises(DataError, match=f"^{file}:3: malformed JSON"):
        sources.read_taskmaster(str(file))
    file.write_text("[]")
    with pytest.raises(DataError, match=f"^{file}: no examples"):
        sources.read_taskmaster(str(file))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match="nothing: no reward_\\*.json files in this directory"):
        sources.read_taskmaster(str(tmp_path / "nothing"))
