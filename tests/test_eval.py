"""foe-eval's pieces without processes: the retrieval generators (length, depth, determinism),
exact-match scoring, and LongBench's per-task metrics against scores computed by hand on a
small synthetic JSONL file per metric (tests/eval_longbench, read with datasets)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from foe_train.config import ConfigError
from foe_train.data.tokenizers import ByteTokenizer
from foe_train.evaluate import longbench, tasks
from foe_train.evaluate.run import parse_tasks

DATA = Path(__file__).parent / "eval_longbench"
TOK = ByteTokenizer()

# task -> (metric name, score by hand). hotpotqa: F1 of "eiffel tower in paris" vs "eiffel
# tower" = 2*(2/4)*(2/2)/(2/4+1) = 2/3, and 0 for "1995" vs "1994" -> 33.33. samsum: first line
# only, LCS(Amanda brings cookies tomorrow / Amanda will bring cookies tomorrow) = 3 words,
# P 3/4, R 3/5, F 2/3 -> 66.67. trec: "City" alone 1, "Location or City" for Location 1/2 ->
# 75. passage_retrieval_en: numbers 3, 5 for Paragraph 3 -> 1/2, then 1 -> 75. passage_count:
# "4" -> 1, "4 or 5" -> 1/2 -> 75. lcc: first non-comment line "return x+1" vs "return x + 1":
# difflib matches 10 of 22 characters twice, ratio 20/22 -> fuzz.ratio 91 -> 91.
BY_HAND = {
    "hotpotqa": ("f1", 33.33), "samsum": ("rouge_l", 66.67),
    "trec": ("classification_accuracy", 75.0), "passage_retrieval_en": ("retrieval_accuracy", 75.0),
    "passage_count": ("count_accuracy", 75.0), "lcc": ("edit_similarity", 91.0),
}


@pytest.mark.parametrize("task", sorted(BY_HAND))
def test_longbench_scores_match_hand_computed(task: str) -> None:
    records = longbench.load(longbench.data_file(str(DATA), task))
    metric, expected = BY_HAND[task]
    assert longbench.metric_name(task) == metric
    assert longbench.score(task, [r["pred"] for r in records], records) == expected


def test_longbench_missing_file_names_it() -> None:
    with pytest.raises(ConfigError, match=r"narrativeqa\.jsonl not found.*nothing is downloaded"):
        longbench.data_file(str(DATA), "narrativeqa")
    with pytest.raises(ConfigError, match="--longbench-dir"):
        longbench.data_file(None, "trec")
    with pytest.raises(ConfigError, match="unknown LongBench task"):
        parse_tasks("val,longbench:nope")


def test_truncate_middle_keeps_both_ends() -> None:
    ids = list(range(10))
    assert longbench.truncate_middle(ids, 4) == [0, 1, 8, 9]
    assert longbench.truncate_middle(ids, 5) == [0, 1, 7, 8, 9]
    assert longbench.truncate_middle(ids, 20) == ids


@pytest.mark.parametrize("task", ["passkey", "kv"])
def test_retrieval_prompts_fit_and_place_the_needle(task: str) -> None:
    lengths, depths = [100, 300], [0.0, 0.5, 1.0]
    items = tasks.samples(task, TOK, lengths, depths, 2, seed=7)
    assert items == tasks.samples(task, TOK, lengths, depths, 2, seed=7)  # deterministic
    assert len(items) == len(lengths) * len(depths) * 2
    for item in items:
        size = len(TOK.encode(item.prompt))
        assert item.length - 30 < size <= item.length  # filled to within one filler unit
        assert item.answer in item.prompt and item.completion.strip(' ".') == item.answer
    long = [i for i in items if i.length == 300]
    needle = "The pass key is" if task == "passkey" else f'"{long[0].answer}"'
    for item in long:
        where = item.prompt.find(needle if task == "passkey" else f'"{item.answer}"')
        relative = where / len(item.prompt)
        assert abs(relative - 0.8 * item.depth) < 0.25  # the question closes the prompt


def test_too_short_length_is_refused() -> None:
    with pytest.raises(ConfigError, match="--lengths: 20 tokens is too short"):
        tasks.samples("passkey", TOK, [20], [0.5], 1)


def test_exact_match_and_score() -> None:
    assert tasks.exact_match(" 12345. Remember", "12345")
    assert tasks.exact_match(' "abc123", "x"', "abc123")
    assert not tasks.exact_match(" 1234", "12345")
    assert not tasks.exact_match("", "12345")
    items = tasks.samples("passkey", TOK, [100, 120], [0.0, 1.0], 1)
    right = [f" {s.answer}." for s in items]
    right[0] = " 00000"
    result = tasks.score(items, right)
    assert result["exact_match"] == 0.75 and result["samples"] == 4
    assert result["by_length"] == {"100": 0.5, "120": 1.0}
    assert result["by_depth"] == {"0.0": 0.5, "1.0": 1.0}


def test_corpus_documents_are_prompt_plus_answer(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    tasks.write_corpus("passkey", path, TOK, 20, 95, 120)
    docs = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    assert len(docs) == 20
    for doc in docs:
        key = doc.split("The pass key is ", 1)[1][:5]
        assert doc.endswith(f"The pass key is {key}.") and len(TOK.encode(doc)) <= 127
