"""LongBench (Bai et al., 2023) on local data: its English tasks read from LongBench's own JSONL
files (``input``, ``context``, ``answers``, ``all_classes`` per line) with ``datasets``, its
prompt and generation length per task, and its scorer with the metric it assigns each task
(the repository's ``metrics.py`` and ``eval.py``), so scores compare with published ones.
Nothing is downloaded: a missing file is one line naming it.

Metrics, as LongBench defines them (each a score in [0, 1] per answer; a prediction takes
its best over the ground truths; the task score is 100 x the mean, rounded to 2 places):
- F1: token F1 of the normalized texts (lower case, no punctuation, no articles a/an/the).
- Rouge-L: F-measure of the longest common subsequence of the whitespace tokens.
- classification accuracy: 1/m when the true class is among the m class names found in the
  prediction (a found name that is part of the true class's name but not it is dropped).
- retrieval: of the numbers in the prediction, the share that equal the paragraph number of
  the answer ("Paragraph N").
- count: of the numbers in the prediction, the share that equal the answer.
- edit similarity: ``fuzz.ratio`` / 100 (difflib's matching ratio, as fuzzywuzzy computes it
  without python-Levenshtein) of the prediction's first line that is not a comment or fence.
"""

from __future__ import annotations

import difflib
import re
import string
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from foe_train.config import ConfigError


def normalize_answer(text: str) -> str:
    """LongBench's (SQuAD's) normalization: lower case, no punctuation, no articles, single
    spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def qa_f1(prediction: str, ground_truth: str, **_: object) -> float:
    pred, truth = normalize_answer(prediction).split(), normalize_answer(ground_truth).split()
    same = sum((Counter(pred) & Counter(truth)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(truth)
    return 2 * precision * recall / (precision + recall)


def _lcs(a: list[str], b: list[str]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], prev + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(prediction: str, ground_truth: str, **_: object) -> float:
    pred, truth = prediction.split(), ground_truth.split()
    common = _lcs(pred, truth)
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(truth)
    return 2 * precision * recall / (precision + recall)


def classification(prediction: str, ground_truth: str, all_classes: list[str] | None = None,
                   **_: object) -> float:
    found = [name for name in all_classes or [] if name in prediction]
    found = [name for name in found if not (name in ground_truth and name != ground_truth)]
    return 1.0 / len(found) if ground_truth in found else 0.0


def _share_equal(prediction: str, target: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    return sum(n == target for n in numbers) / len(numbers) if numbers else 0.0


def retrieval(prediction: str, ground_truth: str, **_: object) -> float:
    return _share_equal(prediction, re.findall(r"Paragraph (\d+)", ground_truth)[0])


def count(prediction: str, ground_truth: str, **_: object) -> float:
    return _share_equal(prediction, str(ground_truth))


def edit_similarity(prediction: str, ground_truth: str, **_: object) -> float:
    lines = prediction.lstrip("\n").split("\n")
    code = next((line for line in lines
                 if "`" not in line and "#" not in line and "//" not in line), "")
    return round(100 * difflib.SequenceMatcher(None, code, ground_truth).ratio()) / 100


Metric = Callable[..., float]
METRICS: dict[str, tuple[str, Metric]] = {
    "f1": ("f1", qa_f1), "rouge_l": ("rouge_l", rouge_l),
    "classification": ("classification_accuracy", classification),
    "retrieval": ("retrieval_accuracy", retrieval), "count": ("count_accuracy", count),
    "edit_sim": ("edit_similarity", edit_similarity),
}

_QA = ("Answer the question based on the given passages. Only give me the answer and do not "
       "output any other words.")
_MULTIHOP = f"{_QA}\n\nThe following are given passages.\n{{context}}\n\n{_QA}\n\n" \
            f"Question: {{input}}\nAnswer:"
# task: (metric, prompt template, max new tokens), from LongBench's config files
TASKS: dict[str, tuple[str, str, int]] = {
    "narrativeqa": ("f1", "You are given a story, which can be either a novel or a movie script, "
                    "and a question. Answer the question asconcisely as you can, using a single "
                    "phrase if possible. Do not provide any explanation.\n\nStory: {context}\n\n"
                    "Now, answer the question based on the story asconcisely as you can, using a "
                    "single phrase if possible. Do not provide any explanation.\n\nQuestion: "
                    "{input}\n\nAnswer:", 128),
    "qasper": ("f1", "You are given a scientific article and a question. Answer the question as "
               "concisely as you can, using a single phrase or sentence if possible. If the "
               "question cannot be answered based on the information in the article, write "
               "\"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", "
               "or \"unanswerable\". Do not provide any explanation.\n\nArticle: {context}\n\n "
               "Answer the question based on the above article as concisely as you can, using a "
               "single phrase or sentence if possible. If the question cannot be answered based "
               "on the information in the article, write \"unanswerable\". If the question is a "
               "yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any "
               "explanation.\n\nQuestion: {input}\n\nAnswer:", 128),
    "multifieldqa_en": ("f1", "Read the following text and answer briefly.\n\n{context}\n\nNow, "
                        "answer the following question based on the above text, only give me "
                        "the answer and do not output any other words.\n\nQuestion: {input}\n"
                        "Answer:", 64),
    "hotpotqa": ("f1", _MULTIHOP, 32),
    "2wikimqa": ("f1", _MULTIHOP, 32),
    "musique": ("f1", _MULTIHOP, 32),
    "gov_report": ("rouge_l", "You are given a report by a government agency. Write a one-page "
                   "summary of the report.\n\nReport:\n{context}\n\nNow, write a one-page "
                   "summary of the report.\n\nSummary:", 512),
    "qmsum": ("rouge_l", "You are given a meeting transcript and a query containing a question "
              "or instruction. Answer the query in one or more sentences.\n\nTranscript:\n"
              "{context}\n\nNow, answer the query based on the above meeting transcript in one "
              "or more sentences.\n\nQuery: {input}\nAnswer:", 512),
    "multi_news": ("rouge_l", "You are given several news passages. Write a one-page summary of "
                   "all news. \n\nNews:\n{context}\n\nNow, write a one-page summary of all the "
                   "news.\n\nSummary:", 512),
    "trec": ("classification", "Please determine the type of the question below. Here are some "
             "examples of questions.\n\n{context}\n{input}", 64),
    "triviaqa": ("f1", "Answer the question based on the given passage. Only give me the answer "
                 "and do not output any other words. The following are some examples.\n\n"
                 "{context}\n\n{input}", 32),
    "samsum": ("rouge_l", "Summarize the dialogue into a few short sentences. The following are "
               "some examples.\n\n{context}\n\n{input}", 128),
    "passage_count": ("count", "There are some paragraphs below sourced from Wikipedia. Some of "
                      "them may be duplicates. Please carefully read these paragraphs and "
                      "determine how many unique paragraphs there are after removing "
                      "duplicates. In other words, how many non-repeating paragraphs are there "
                      "in total?\n\n{context}\n\nPlease enter the final count of unique "
                      "paragraphs after removing duplicates. The output format should only "
                      "contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: ",
                      32),
    "passage_retrieval_en": ("retrieval", "Here are 30 paragraphs from Wikipedia, along with an "
                             "abstract. Please determine which paragraph the abstract is from."
                             "\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\n"
                             "Please enter the number of the paragraph that the abstract is "
                             "from. The answer format must be like \"Paragraph 1\", \"Paragraph "
                             "2\", etc.\n\nThe answer is: ", 32),
    "lcc": ("edit_sim", "Please complete the code given below. \n{context}Next line of code:\n",
            64),
    "repobench-p": ("edit_sim", "Please complete the code given below. \n{context}{input}Next "
                    "line of code:\n", 64),
}
# LongBench scores only the first line of these tasks' predictions (few-shot formats).
_FIRST_LINE = {"trec", "triviaqa", "samsum"}


def data_file(directory: str | None, task: str) -> Path:
    """LongBench's JSONL for ``task`` under ``directory`` (its data/ folder), checked to exist."""
    if task not in TASKS:
        raise ConfigError(f"--tasks: unknown LongBench task {task!r}; use one of "
                          f"{', '.join(sorted(TASKS))}")
    if directory is None:
        raise ConfigError(f"--longbench-dir: longbench:{task} needs LongBench's data directory; "
                          f"pass --longbench-dir DIR holding {task}.jsonl")
    path = Path(directory).expanduser() / f"{task}.jsonl"
    if not path.is_file():
        raise ConfigError(f"--longbench-dir: {path} not found; put LongBench's data/{task}.jsonl "
                          f"there (nothing is downloaded)")
    return path


def load(path: Path, limit: int | None = None) -> list[dict]:
    """The records of one LongBench JSONL file (the first ``limit`` of them)."""
    import datasets

    try:
        records = datasets.load_dataset("json", data_files=str(path), split="train")
    except Exception as exc:  # datasets raises many kinds for unreadable JSON
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"--longbench-dir: cannot read {path} as JSONL ({first})") from None
    missing = {"input", "context", "answers"} - set(records.column_names)
    if missing:
        raise ConfigError(f"--longbench-dir: {path} lacks field(s) {', '.join(sorted(missing))} "
                          f"of LongBench's format (input, context, answers, all_classes)")
    return records.to_list()[:limit]


def prompt(task: str, record: dict) -> str:
    return TASKS[task][1].format(context=record["context"], input=record["input"])


def max_new_tokens(task: str) -> int:
    return TASKS[task][2]


def metric_name(task: str) -> str:
    return METRICS[TASKS[task][0]][0]


def truncate_middle(ids: list[int], budget: int) -> list[int]:
    """LongBench's truncation: keep the first and last budget/2 tokens of a long prompt."""
    if len(ids) <= budget:
        return ids
    half = budget // 2
    return ids[:half] + ids[len(ids) - (budget - half):]


def score(task: str, predictions: list[str], records: list[dict]) -> float:
    """LongBench's task score: 100 x the mean over records of the best score against any of
    the record's answers, rounded to 2 places."""
    metric = METRICS[TASKS[task][0]][1]
    total = 0.0
    for prediction, record in zip(predictions, records, strict=True):
        if task in _FIRST_LINE:
            prediction = prediction.lstrip("\n").split("\n")[0]
        total += max((metric(prediction, truth, all_classes=record.get("all_classes"))
                      for truth in record["answers"]), default=0.0)
    return round(100 * total / len(predictions), 2)
