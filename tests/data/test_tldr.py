"""Reddit TL;DR: the readers on the real files and on excerpts, the split by post, the SFT mix, the errors."""

import collections
import gzip
import itertools
import json
import os

import pytest

from pe_rlhf.data import sources
from pe_rlhf.data.examples import DataError, LabeledExample, Loaded, PreferenceExample, PromptResponse
from pe_rlhf.data.named import dataset_part, named_dataset, sft_mix

POSTS = dict(held_out=100, judge_fraction=0.5, seed=0, by="post")  # the TL;DR experiment's split
REFS = dict(held_out=100, judge_fraction=0.0, seed=0, by="post")


@pytest.fixture(scope="module")
def tldr(shared_data):
    return named_dataset("tldr", data_dir=shared_data)


@pytest.fixture(scope="module")
def refs(shared_data):
    return named_dataset("tldr_references", data_dir=shared_data)


def _write(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


def _body(prompt):
    """A post's text (after " POST: ", before the cue), apostrophes made plain: copies of one post agree on it."""
    return prompt.split(" POST: ", 1)[1].removesuffix(sources.TLDR_CUE).replace("\u2019", "'")


# ---------------------------------------------------------------------------- the real files


def test_comparisons_read_as_pairs_with_the_cue(tldr, shared_data):
    assert len(tldr) == 9035 and tldr.skipped_identical == 0
    raw = [json.loads(line) for line in gzip.open(os.path.join(shared_data, sources.TLDR_COMPARISONS), "rt")]
    for e, row in zip(tldr.examples, raw):
        assert e.prompt == row["prompt"] + "\n\nTL;DR:" and e.group == "" and e.margin == 0.0
        for response, text in ((e.chosen, row["chosen"]), (e.rejected, row["rejected"])):
            assert response == " " + text.removeprefix("TL;DR:").strip()
    first = tldr.examples[0]
    assert first.prompt.startswith("SUBREDDIT: relationships TITLE: Me [22 M] trying to understand if second "
                                   "chances exist? POST: Assume you truly liked someone")
    assert first.prompt.endswith("so maybe there is a way to not do it in person...\n\nTL;DR:")
    assert first.chosen == " Girl doesn't know if I like her.  If she thinks I do, would she give me another chance?"
    assert len({e.prompt for e in tldr.examples}) == 1503
    assert len({sources.tldr_post(e.prompt) for e in tldr.examples}) == 1500


def test_references_read_as_sft_examples_rendered_like_the_comparisons(refs, shared_data):
    assert len(refs) == 500
    raw = [json.loads(line) for line in gzip.open(os.path.join(shared_data, sources.TLDR_REFERENCES), "rt")]
    assert refs.examples[0] == PromptResponse(
        f"SUBREDDIT: relationships TITLE: {raw[0]['title']} POST: {raw[0]['post']}\n\nTL;DR:",
        " I really like this guy, but after having sex with him after only knowing him for a very brief period of "
        "time, I am worried that I may have ruined my chances of a relationship with him.")
    assert all(e.response == " " + r["summary"].strip() for e, r in zip(refs.examples, raw))
    assert len({sources.tldr_post(e.prompt) for e in refs.examples}) == 500  # every reference is its own post


def test_a_post_held_twice_has_one_key(tldr):
    """Two posts appear with two texts each (a curly apostrophe; a truncated copy): the exact prompt would count
    them as four posts, and could put a post in two parts. Their subreddit and title name each once."""
    by_post = {}
    for e in tldr.examples:
        by_post.setdefault(sources.tldr_post(e.prompt), set()).add(e.prompt)
    twice = {k: sorted(v, key=len) for k, v in by_post.items() if len(v) > 1}
    assert len(twice) == 3
    porn, xbox, template = (next(v for k, v in twice.items() if word in k)
                            for word in ("equates porn", "Dirty Xbox", "[00 M/F]"))
    assert porn[0].replace("\u2019", "'") == porn[1].replace("\u2019", "'")
    assert xbox[1].startswith(xbox[0].removesuffix(sources.TLDR_CUE))
    # a title left as the subreddit's template holds two different posts: kept together, which costs nothing
    assert _body(template[0])[:100] != _body(template[1])[:100]


def test_the_split_by_post_never_puts_a_post_in_two_parts(tldr):
    parts = {p: dataset_part(tldr, p, **POSTS) for p in ("eval", "judge", "train")}
    posts = {p: {sources.tldr_post(e.prompt) for e in part.examples} for p, part in parts.items()}
    sizes = {p: (len(posts[p]), len(parts[p])) for p in parts}  # (posts, comparisons)
    assert sizes == {"eval": (100, 597), "judge": (700, 4255), "train": (700, 4183)}
    assert sum(len(p) for p in parts.values()) == len(tldr)
    for a, b in itertools.combinations(parts, 2):
        assert not posts[a] & posts[b], (a, b)
        # independently of the key: no post's text opens the same way in two parts (this catches the
        # apostrophe and the truncated copies, which the exact prompt would not)
        assert not ({_body(e.prompt)[:100] for e in parts[a].examples}
                    & {_body(e.prompt)[:100] for e in parts[b].examples}), (a, b)
    # a post's several comparisons all sit in its part
    per_post = {}
    for e in tldr.examples:
        per_post.setdefault(sources.tldr_post(e.prompt), []).append(e)
    for p, part in parts.items():
        held = collections.Counter(sources.tldr_post(e.prompt) for e in part.examples)
        assert held == {k: len(per_post[k]) for k in posts[p]}, p
    assert max(len(v) for v in per_post.values()) == 18
    assert parts["train"].examples == dataset_part(tldr, "train", **POSTS).examples  # the same on every call
    assert parts["eval"].source.endswith("[eval part by post, seed 0]")


def test_references_split_into_held_out_prompts_and_sft_examples(refs, tldr):
    held, train = dataset_part(refs, "eval", **REFS), dataset_part(refs, "train", **REFS)
    assert (len(held), len(train)) == (100, 400)
    assert not {e.prompt for e in held.examples} & {e.prompt for e in train.examples}
    with pytest.raises(ValueError, match=r"judge_fraction=0\) asks for a judge part that is empty"):
        dataset_part(refs, "judge", **REFS)
    # SFT: the references' train part and the chosen summaries of the comparisons' train part, each once
    comparisons = dataset_part(tldr, "train", **POSTS)
    sft = sft_mix([train, comparisons])
    chosen = list(dict.fromkeys(PromptResponse(e.prompt, e.chosen) for e in comparisons.examples))
    assert sft.examples == train.examples + tuple(chosen)
    assert len(sft) == 400 + 2068  # of 4,183 pairs: a summary often wins several of its post's comparisons
    assert "(SFT examples, each once)" in sft.source


# ---------------------------------------------------------------------------- excerpts and errors


def test_an_excerpt_keeps_a_post_with_several_comparisons_in_one_part(tmp_path, shared_data):
    """The first 60 lines of the file (about ten posts) through the reader and the split."""
    with gzip.open(os.path.join(shared_data, sources.TLDR_COMPARISONS), "rt") as f:
        lines = [next(f).rstrip("\n") for _ in range(60)]
    loaded = sources.read_tldr_comparisons(_write(tmp_path / "excerpt.jsonl", lines))
    posts = {sources.tldr_post(e.prompt) for e in loaded.examples}
    assert len(loaded) == 60 and 8 <= len(posts) <= 12
    owner = {}
    for part in ("eval", "judge", "train"):
        for e in dataset_part(loaded, part, held_out=2, judge_fraction=0.5, seed=1, by="post").examples:
            assert owner.setdefault(sources.tldr_post(e.prompt), part) == part
    assert set(owner) == posts and list(owner.values()).count("eval") == 2


def test_comparison_errors_name_file_line_and_field(tmp_path):
    good = {"prompt": "SUBREDDIT: a TITLE: b POST: c", "chosen": "TL;DR: x", "rejected": "TL;DR:  y "}
    path = _write(tmp_path / "c.jsonl", [good, dict(good, rejected="y")])
    with pytest.raises(DataError, match=f"^{path}:2: field 'rejected' must start with 'TL;DR:'"):
        sources.read_tldr_comparisons(path)
    path = _write(tmp_path / "c.jsonl", [good, dict(good, chosen="TL;DR:   ")])
    with pytest.raises(DataError, match=f"^{path}:2: field 'chosen' holds no summary text"):
        sources.read_tldr_comparisons(path)
    path = _write(tmp_path / "c.jsonl", [good, {"prompt": "p", "chosen": "TL;DR: x"}])
    with pytest.raises(DataError, match=f"^{path}:2: missing field 'rejected' \\(fields present: chosen, prompt\\)"):
        sources.read_tldr_comparisons(path)
    # two summaries that differ only in whitespace carry no preference: skipped and counted
    path = _write(tmp_path / "c.jsonl", [good, dict(good, chosen="TL;DR:  z", rejected="TL;DR: z  ")])
    loaded = sources.read_tldr_comparisons(path)
    assert loaded.skipped_identical == 1
    assert loaded.examples == (PreferenceExample("SUBREDDIT: a TITLE: b POST: c\n\nTL;DR:", " x", " y"),)


def test_reference_errors_name_file_line_and_field(tmp_path):
    good = {"id": "t3_1", "subreddit": "a", "title": "b", "post": "c", "summary": " s "}
    path = _write(tmp_path / "r.jsonl", [good])
    assert sources.read_tldr_references(path).examples == (
        PromptResponse("SUBREDDIT: a TITLE: b POST: c\n\nTL;DR:", " s"),)
    path = _write(tmp_path / "r.jsonl", [good, {k: v for k, v in good.items() if k != "summary"}])
    with pytest.raises(DataError, match=f"^{path}:2: missing field 'summary'"):
        sources.read_tldr_references(path)
    path = _write(tmp_path / "r.jsonl", [dict(good, title=7)])
    with pytest.raises(DataError, match=f"^{path}:1: field 'title' must be a string, got int"):
        sources.read_tldr_references(path)
    with pytest.raises(FileNotFoundError, match="tldr/reference_summaries.jsonl.gz in the data directory"):
        sources.read_tldr_references(str(tmp_path / "nope.jsonl"))


def test_sft_mix_by_hand():
    pairs = Loaded((PreferenceExample("p", " a", " b"), PreferenceExample("p", " a", " c"),
                    PreferenceExample("q", " d", " a")), "pairs")
    labeled = Loaded((LabeledExample("r", " good", 1.0), LabeledExample("r", " bad", 0.0)), "labeled")
    sft = Loaded((PromptResponse("q", " d"), PromptResponse("s", " e")), "sft")
    mixed = sft_mix([sft, pairs, labeled])
    assert mixed.examples == (PromptResponse("q", " d"), PromptResponse("s", " e"), PromptResponse("p", " a"),
                              PromptResponse("r", " good"))
    assert mixed.source == "sft + pairs + labeled (SFT examples, each once)"
    with pytest.raises(ValueError, match="give at least one dataset"):
        sft_mix([])
    with pytest.raises(TypeError, match="^odd: sft_mix takes sets of"):
        sft_mix([Loaded(("text",), "odd")])


def test_judge_fraction_zero_leaves_no_judge_part_for_any_key():
    data = Loaded(tuple(PromptResponse(f"SUBREDDIT: s TITLE: t{i} POST: x\n\nTL;DR:", " y") for i in range(10)), "d")
    for by in ("prompt", "post"):
        parts = {p: dataset_part(data, p, held_out=3, judge_fraction=0.0, by=by) for p in ("eval", "train")}
        assert (len(parts["eval"]), len(parts["train"])) == (3, 7)
    with pytest.raises(ValueError, match=r"judge_fraction=1.0\): must be in \[0, 1\)"):
        dataset_part(data, "eval", judge_fraction=1.0, by="post")
    with pytest.raises(ValueError, match="cannot hold out 10 posts per group"):
        dataset_part(data, "eval", held_out=10, by="post")
