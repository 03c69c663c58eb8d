"""foe-study: train every member of an identical-budget study for every seed, evaluate each and
write one comparison report, so a quality claim comes with its seed-to-seed noise.

A study is a directory holding ``study.yaml`` (schema ``StudyConfig``) and the member recipes
it names. Run directories are ``RUNS/seed<S>/<member>``; the study is resumable: a member whose
summary says it finished is not retrained (an interrupted one continues from its newest
checkpoint with ``--resume auto``), and an evaluation whose ``eval.json`` already scored the
member's final checkpoint on the same tasks is not repeated.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator
from tqdm import tqdm

from foe_train.arguments import OneLineParser, at_least
from foe_train.config import ConfigError, RecipeConfig, load_config


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CorpusSpec(_Strict):
    """A generated training corpus (``foe_train.evaluate.tasks``) instead of the recipe's data:
    ``documents`` task prompts with their answers, each of ``min_length``..``max_length``
    tokens."""

    task: Literal["passkey", "kv"]
    documents: int = 20000
    min_length: int = 32
    max_length: int = 120


class EvalSpec(_Strict):
    """What foe-eval runs on each member (see ``foe-eval --help`` for the task names)."""

    tasks: list[str] = ["val"]
    lengths: list[int] | None = None
    depths: list[float] | None = None
    samples: int = 4
    longbench_dir: str | None = None


class StudyConfig(_Strict):
    members: dict[str, str]
    baseline: str
    nproc: int
    runs: str
    eval: EvalSpec = EvalSpec()
    corpus: CorpusSpec | None = None
    overrides: list[str] = []

    @model_validator(mode="after")
    def _baseline_is_member(self) -> StudyConfig:
        if self.baseline not in self.members:
            raise ValueError(f"baseline: {self.baseline!r} is not one of members "
                             f"{sorted(self.members)}; name the MoE member")
        return self


def load_study(path: str) -> tuple[StudyConfig, Path]:
    """The study's config and its directory (``path`` is the directory or its study.yaml);
    every member recipe must exist and load."""
    root = Path(path)
    file = root / "study.yaml" if root.is_dir() else root
    if not file.is_file():
        raise ConfigError(f"study: {file} does not exist; pass a directory holding study.yaml, "
                          f"e.g. configs/study/cpu")
    study = load_config(file, schema=StudyConfig)
    for name, recipe in study.members.items():
        load_config(file.parent / recipe, study.overrides)
        if "/" in name or name.startswith("."):
            raise ConfigError(f"members: {name!r} is used as a directory name; use a plain name")
    return study, file.parent


def finished(run_dir: Path, train_iters: int) -> bool:
    """True when the run's summary says it trained all its steps (not stopped by a signal)."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return False
    summary = json.loads(path.read_text())
    return summary.get("steps") == train_iters and not summary.get("stopped_by_signal")


def _exit_code(entry: Callable[[list[str]], None], argv: list[str]) -> int:
    """Run a foe-* entry point in this process; its sys.exit becomes the return value."""
    try:
        entry(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


def _check_corpus(spec: CorpusSpec, recipe: RecipeConfig) -> None:
    """Refuse a corpus whose shortest documents cannot hold a prompt, before any training."""
    from foe_train.data.tokenizers import build_tokenizer
    from foe_train.evaluate.tasks import samples

    if not 0 < spec.min_length <= spec.max_length or spec.documents < 1:
        raise ConfigError(f"corpus: need documents >= 1 and 0 < min_length <= max_length (got "
                          f"{spec.documents}, {spec.min_length}, {spec.max_length})")
    tokenizer = build_tokenizer(recipe.data.tokenizer, recipe.data.tokenizer_path)
    try:
        samples(spec.task, tokenizer, [spec.min_length], [0.0], 1)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("--lengths", "corpus.min_length")) from None


def corpus_prefix(study: StudyConfig, recipe: RecipeConfig, runs: Path) -> str:
    """The study's generated corpus as a prepared dataset under RUNS/corpus, written once (in
    the members' tokenizer) and reused by every member and seed."""
    from foe_train.data.prepare import prepare_dataset
    from foe_train.data.tokenizers import build_tokenizer
    from foe_train.evaluate.tasks import write_corpus

    spec = study.corpus
    prefix = runs / "corpus" / f"{spec.task}-{spec.documents}-{spec.min_length}-{spec.max_length}"
    if not Path(f"{prefix}.idx").is_file():
        tokenizer = build_tokenizer(recipe.data.tokenizer, recipe.data.tokenizer_path)
        text = Path(f"{prefix}.jsonl")
        text.parent.mkdir(parents=True, exist_ok=True)
        write_corpus(spec.task, text, tokenizer, spec.documents, spec.min_length,
                     spec.max_length)
        prepare_dataset([str(text)], str(prefix), tokenizer)
    return str(prefix)


def _eval_done(run_dir: Path, tasks: list[str]) -> bool:
    """eval.json scored this run's newest checkpoint on (at least) these tasks."""
    from foe_train.checkpoint import newest

    path = run_dir / "eval.json"
    if not path.is_file():
        return False
    done = json.loads(path.read_text())
    return (done.get("checkpoint") == str(newest(run_dir))
            and set(tasks) <= set(done.get("results", {})))


def _eval_argv(spec: EvalSpec, run_dir: Path, nproc: int) -> list[str]:
    argv = ["--checkpoint", str(run_dir), "--tasks", ",".join(spec.tasks), "--nproc",
            str(nproc), "--samples", str(spec.samples)]
    if spec.lengths:
        argv += ["--lengths", ",".join(map(str, spec.lengths))]
    if spec.depths:
        argv += ["--depths", ",".join(map(str, spec.depths))]
    if spec.longbench_dir:
        argv += ["--longbench-dir", spec.longbench_dir]
    return argv


def run_study(study: StudyConfig, root: Path, recipes: dict[str, RecipeConfig], runs: Path,
              seeds: int, overrides: list[str], out: Path) -> int:
    """Train (seed-major, so a cut-short study still has whole seeds), evaluate, report.
    Returns the exit code of the first step that failed, else 0."""
    from foe_train.cli import train_main

    extra = list(overrides)
    if study.corpus is not None:
        extra.append(f"data.prefixes=[{corpus_prefix(study, recipes[study.baseline], runs)}]")
    plan = [(seed, name) for seed in range(1, seeds + 1) for name in study.members]
    run_dirs = []
    bar = tqdm(plan, desc="foe-study", unit="member", file=sys.stderr)
    for seed, name in bar:
        run_dir = runs / f"seed{seed}" / name
        run_dirs.append(run_dir)
        bar.set_postfix_str(f"seed {seed} {name}")
        if not finished(run_dir, recipes[name].training.train_iters):
            argv = ["--config", str(root / study.members[name]), "--nproc", str(study.nproc),
                    "--resume", "auto", *extra, f"seed={seed}", f"logging.name={name}",
                    f"logging.run_dir={run_dir}"]
            tqdm.write(f"foe-study: training {name} seed {seed} -> {run_dir}")
            code = _exit_code(train_main, argv)
            if code:
                return code
    from foe_train.evaluate.run import main as eval_main
    from foe_train.report import write_report

    for run_dir in tqdm(run_dirs, desc="foe-study eval", unit="run", file=sys.stderr):
        if not _eval_done(run_dir, study.eval.tasks):
            code = _exit_code(eval_main, _eval_argv(study.eval, run_dir, study.nproc))
            if code:
                return code
    report = write_report(run_dirs, out, baseline=study.baseline)
    print(report["markdown"], flush=True)
    print(f"foe-study: report {out / 'report.md'}, {out / 'report.json'}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> None:
    """foe-study STUDY_DIR [--seeds N] [--runs DIR] [--out DIR] [key=value ...]"""
    ap = OneLineParser(prog="foe-study", description="train, evaluate and compare every "
                        "member of a study for several seeds")
    ap.add_argument("study", help="study directory holding study.yaml, e.g. configs/study/cpu")
    ap.add_argument("--seeds", type=at_least(1), default=3, help="seeds 1..N (default 3)")
    ap.add_argument("--runs", help="run directories under here (default: the study's runs)")
    ap.add_argument("--out", help="report directory (default RUNS/report)")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides for every member")
    args = ap.parse_args(argv)
    try:
        study, root = load_study(args.study)
        overrides = study.overrides + args.overrides
        recipes = {name: load_config(root / path, overrides)
                   for name, path in study.members.items()}
        if study.corpus is not None:
            _check_corpus(study.corpus, recipes[study.baseline])
        runs = Path(args.runs or study.runs).expanduser().resolve()
        code = run_study(study, root, recipes, runs, args.seeds, overrides,
                         Path(args.out) if args.out else runs / "report")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code)
