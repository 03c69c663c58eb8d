"""foe-study end to end on a tiny two-member study (tests/eval_study): real 2-process training
and foe-eval launches, then the report. foe-eval's validation loss must equal the training
run's own last val_loss (same batches, same weights, loaded back from the checkpoint on a new
process group), the report must carry the run files' numbers, and a second call must find
everything done and launch nothing."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from PIL import Image

from foe_train.evaluate.run import main as eval_main
from foe_train.study import main as study_main

STUDY = Path(__file__).parent / "eval_study"


def _run(entry, argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exc:
        entry(argv)
    return exc.value.code


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    runs = tmp_path_factory.mktemp("study")
    assert _run(study_main, [str(STUDY), "--seeds", "1", "--runs", str(runs)]) == 0
    return runs


def test_eval_val_loss_is_the_runs_own(study: Path) -> None:
    for member in ("moe", "foe"):
        run = study / "seed1" / member
        summary = json.loads((run / "summary.json").read_text())
        results = json.loads((run / "eval.json").read_text())["results"]
        assert results["val"]["loss"] == pytest.approx(summary["final_val_loss"], rel=1e-5)
        assert results["passkey"]["samples"] == 2
        assert 0 <= results["passkey"]["exact_match"] <= 1


def test_report_carries_the_run_numbers(study: Path) -> None:
    report = json.loads((study / "report" / "report.json").read_text())
    val = {m: json.loads((study / "seed1" / m / "summary.json").read_text())["final_val_loss"]
           for m in ("moe", "foe")}
    foe = report["summary"]["members"]["foe"]
    assert foe["final_val_loss"]["mean"] == val["foe"]
    assert foe["gap_pct"] == pytest.approx(100 * (val["foe"] / val["moe"] - 1))
    assert foe["eval"]["val"]["mean"] == pytest.approx(val["foe"], rel=1e-5)
    rows = [json.loads(line) for line in
            (study / "seed1" / "foe" / "metrics.jsonl").read_text().splitlines()]
    run = next(r for r in report["runs"] if r["member"] == "foe")
    assert run["tokens_per_s"] == statistics.median(r["tokens_per_s"] for r in rows
                                                    if "tokens_per_s" in r)
    assert run["comm_bytes_per_token"] > 0 and set(run["expert_load"]) == {"cluster0",
                                                                          "cluster1"}
    for name in report["plots"]:
        with Image.open(study / "report" / name) as image:
            image.verify()


def test_second_call_launches_nothing(study: Path) -> None:
    files = [study / "seed1" / m / f for m in ("moe", "foe") for f in ("summary.json",
                                                                        "eval.json")]
    before = [f.stat().st_mtime_ns for f in files]
    assert _run(study_main, [str(STUDY), "--seeds", "1", "--runs", str(study)]) == 0
    assert [f.stat().st_mtime_ns for f in files] == before


def test_missing_longbench_file_is_one_line(study: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["--checkpoint", str(study / "seed1" / "foe"), "--tasks", "longbench:trec",
            "--longbench-dir", str(study)]
    assert _run(eval_main, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "trec.jsonl not found" in err
