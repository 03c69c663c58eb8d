"""foe-bench train end to end: one real 4-rank run of a tiny FoE/MoE pair (the JSON report's
shape, its ratio, the profiles, nothing written to a run directory), and the one-line
refusals that come before any process starts."""

import json
import subprocess
import sys

import pytest

from foe_train.bench.stats import DRIFT_WARNING, drift, median_interval, paired_ratios
from foe_train.bench.train_bench import format_report
from foe_train.cli import bench_main
from tests.test_cli_input import refused

PAIR = ["configs/quickstart/foe.yaml", "configs/quickstart/moe.yaml"]
TINY = ["model.num_layers=2", "model.seq_length=32", "training.global_batch_size=8",
        "training.micro_batch_size=2", "training.train_iters=10", "training.warmup_iters=1"]


def bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "foe_train.cli", "train", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_train_bench_pair_json(tmp_path):
    """From a cold data cache: preparing the default corpus must not break stdout's JSON."""
    out, runs = tmp_path / "train.json", tmp_path / "runs"
    proc = bench("--pair", *PAIR, "--nproc", "4", "--steps", "3", "--warmup", "1", "--json",
                 "--out", str(out), *TINY, f"logging.run_dir={runs}/{{name}}",
                 f"data.cache_dir={tmp_path}/cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert json.loads(proc.stdout) == report
    assert (report["world_size"], report["nodes"], report["steps"]) == (4, 1, 3)
    (row,) = report["rows"]
    for kind in ("foe", "moe"):
        member = row[kind]
        for metric in ("tokens_per_s", "step_s", "cpu_s"):
            assert set(member[metric]) == {"median", "p10", "p90", "mean"}
            assert 0 < member[metric]["p10"] <= member[metric]["median"] <= member[metric]["p90"]
        assert member["tokens_per_step"] == 8 * 32
        assert member["profile"] and all(op["self_cpu_ms"] >= 0 and op["calls"] > 0
                                         for op in member["profile"])
        assert member["collective_s"] > 0 and member["collectives"]
        assert member["drift"] > -1
    assert row["ratio"]["tokens_per_s"] == pytest.approx(
        row["foe"]["tokens_per_s"]["median"] / row["moe"]["tokens_per_s"]["median"])
    assert row["ratio"]["cpu_s"] == pytest.approx(
        row["foe"]["cpu_s"]["median"] / row["moe"]["cpu_s"]["median"])
    rounds = row["ratio"]["per_round"]
    assert 0 < rounds["p10"] <= rounds["median"] <= rounds["p90"] and 0 <= rounds["wins"] <= 1
    assert rounds["ci95_low"] <= rounds["median"] <= rounds["ci95_high"]
    assert any(k.startswith("all_to_all@ep") for k in row["moe"]["collectives"])
    assert not runs.exists()  # no checkpoints, metrics or W&B run
    # the text report names the drift, and warns only when the machine's speed changed
    assert "machine drift" in format_report(report)
    for value, warned in ((0.0, False), (-2 * DRIFT_WARNING, True)):
        row["foe"]["drift"] = row["moe"]["drift"] = value
        assert ("warning: the machine's speed changed" in format_report(report)) == warned


def test_paired_ratios_are_per_round():
    # each round its own ratio (1.0, 1.0, 1.1), whatever the machine did in between
    rounds = paired_ratios([100.0, 50.0, 110.0], [100.0, 50.0, 100.0])
    assert rounds["median"] == pytest.approx(1.0) and rounds["p90"] == pytest.approx(1.1)
    assert rounds["wins"] == pytest.approx(1 / 3)
    assert (rounds["ci95_low"], rounds["ci95_high"]) == pytest.approx((1.0, 1.1))


def test_drift_compares_the_halves_of_a_run():
    assert drift([100.0, 100.0, 60.0, 60.0]) == pytest.approx(-0.4)
    assert drift([100.0, 100.0, 999.0, 110.0, 110.0]) == pytest.approx(0.1)  # middle left out
    assert drift([100.0]) == 0.0


@pytest.mark.parametrize(("n", "ranks"), [(5, (1, 5)), (6, (1, 6)), (10, (2, 9)), (20, (6, 15)),
                                          (60, (22, 39)), (100, (40, 61))])
def test_median_interval_is_the_binomial_order_statistics(n, ranks):
    # the ranks of the 95% interval of a median that tables of the sign test give
    values = [float(v) for v in range(n, 0, -1)]  # unsorted on purpose
    assert median_interval(values) == ranks


@pytest.mark.parametrize(("args", "message"), [
    (["--pair", PAIR[0], PAIR[0], "--nproc", "4"], "pass one foe and one moe recipe"),
    (["--pair", *PAIR, "--nproc", "3"], "the world size is 3"),
    (["--pair", *PAIR, "--nproc", "4", "--nodes", "3"], "--nodes 3 must divide"),
    (["--pair", *PAIR, "--nproc", "4", "--steps", "0"], "--steps: 0 is below 1"),
])
def test_train_bench_refuses_in_one_line(args, message, monkeypatch, capsys):
    assert message in refused(bench_main, monkeypatch, capsys, "train", *args)
