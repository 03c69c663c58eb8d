"""foe-compare's report: every number in report.json and report.md is the one in the run
files, the FoE-MoE gap and its seed spread are computed from them, and the PNGs open."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import yaml
from PIL import Image

from foe_train.cli import compare_main
from foe_train.config import load_config

RECIPES = Path(__file__).resolve().parents[1] / "configs" / "study" / "cpu"
# (member, seed) -> final validation loss, chosen so gaps and spreads are easy to check
VAL = {("moe", 1): 2.0, ("moe", 2): 2.2, ("foe", 1): 2.1, ("foe", 2): 2.2}


def _write_run(root: Path, member: str, seed: int, val: float) -> Path:
    """A run directory as foe-train writes it (config.yaml, summary, metrics, comm, eval)."""
    run = root / f"seed{seed}" / member
    run.mkdir(parents=True)
    cfg = load_config(RECIPES / f"{member}.yaml", [f"seed={seed}", f"logging.name={member}"])
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    steps, tokens_per_step = 4, 32 * 128
    rows = []
    for step in range(1, steps + 1):
        rows.append({"step": step, "loss": 5.0 - step * 0.5 - seed * 0.01,
                     "tokens": step * tokens_per_step, "tokens_per_s": 1000.0 * step,
                     "expert_load_imbalance/cluster0": 1.0 + step / 10,
                     "expert_load_imbalance/cluster1": 2.0 + step / 10})
    rows.append({"step": steps, "val_loss": val, "split": "valid"})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "summary.json").write_text(json.dumps({
        "final_train_loss": rows[steps - 1]["loss"], "final_val_loss": val, "steps": steps,
        "tokens": steps * tokens_per_step, "wall_time_s": 12.5, "params": 1000,
        "active_params_per_token": 500, "stopped_by_signal": False, "kind": cfg.model.kind}))
    (run / "comm_step.json").write_text(json.dumps({"step": 1, "nodes": 1, "by_kind": {
        "all_reduce@federation": {"bytes": 4096 * 10, "cross_node_bytes": 0, "calls": 3,
                                  "seconds": 0.1},
        "all_to_all@ep": {"bytes": 4096 * 3, "cross_node_bytes": 4096, "calls": 2,
                          "seconds": 0.1}}}))
    (run / "eval.json").write_text(json.dumps({"checkpoint": "x", "step": steps, "results": {
        "val": {"loss": val + 0.01, "perplexity": 9.0, "tokens": 1},
        "passkey": {"exact_match": 0.5 * seed, "samples": 2}}}))
    return run


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], Path]:
    root = tmp_path_factory.mktemp("runs")
    runs = [_write_run(root, m, s, v) for (m, s), v in VAL.items()]
    out = root / "report"
    bench = root / "latency.json"
    bench.write_text(json.dumps({"rows": [{"batch": 4, "prompt_len": 64, "gen_len": 4,
                                           "ratio": {"forward": 1.5, "ttft": 1.4, "tbt": 1.3}}]}))
    compare_main([*map(str, runs), "--out", str(out), "--bench", str(bench)])
    return runs, out


def test_report_numbers_equal_run_files(study: tuple[list[Path], Path]) -> None:
    runs, out = study
    report = json.loads((out / "report.json").read_text())
    by_dir = {r["dir"]: r for r in report["runs"]}
    for run in runs:
        got = by_dir[str(run)]
        summary = json.loads((run / "summary.json").read_text())
        for key in ("final_train_loss", "final_val_loss", "steps", "tokens"):
            assert got[key] == summary[key]
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert got["tokens_per_s"] == statistics.median(r["tokens_per_s"] for r in rows
                                                        if "tokens_per_s" in r)
        assert got["comm_bytes_per_token"] == 13 * 4096 / (32 * 128)
        assert got["cross_node_bytes_per_token"] == 4096 / (32 * 128)
        assert got["expert_load"]["cluster1"] == pytest.approx(2.4)  # last 20% of 4 steps
        assert got["eval"]["passkey"] == 0.5 * got["seed"]
    members = report["summary"]["members"]
    assert report["summary"]["baseline"] == "moe"
    foe = members["foe"]
    assert foe["final_val_loss"]["mean"] == pytest.approx(2.15)
    assert foe["final_val_loss"]["std"] == pytest.approx(statistics.stdev([2.1, 2.2]))
    assert foe["gap_pct"] == pytest.approx(100 * (2.15 / 2.1 - 1))
    paired = [100 * (2.1 / 2.0 - 1), 0.0]
    assert foe["paired_gap_pct"]["mean"] == pytest.approx(statistics.fmean(paired))
    assert foe["paired_gap_pct"]["std"] == pytest.approx(statistics.stdev(paired))
    assert foe["budget_differs_from_baseline"] == []
    assert report["latency"][0]["ratio"]["forward"] == 1.5


def test_markdown_shows_the_same_numbers(study: tuple[list[Path], Path]) -> None:
    _, out = study
    text = (out / "report.md").read_text()
    report = json.loads((out / "report.json").read_text())
    foe = report["summary"]["members"]["foe"]
    for number in (foe["final_val_loss"]["mean"], foe["gap_pct"], foe["paired_gap_pct"]["std"]):
        assert f"{number:.4f}" in text
    for field in ("total_params", "flops_per_token", "tokens/s", "passkey", "forward"):
        assert field in text


def test_pngs_open(study: tuple[list[Path], Path]) -> None:
    _, out = study
    names = json.loads((out / "report.json").read_text())["plots"]
    assert set(names) == {"loss_vs_tokens.png", "val_loss_per_seed.png", "expert_load.png",
                          "latency_ratios.png"}
    for name in names:
        with Image.open(out / name) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 100


def test_unfinished_run_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        compare_main([str(tmp_path), "--out", str(tmp_path / "r")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no summary.json" in err
