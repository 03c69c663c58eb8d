"""foe-bench latency end to end: the table/JSON for a recipe pair on one node and on two
emulated nodes with a capped link (then nothing of the emulation is left), from random weights
and from foe-train checkpoints, with the expert imbalance each prefill met."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from foe_train.bench.comm_model import predict
from foe_train.config import load_config
from launch.netns import leftover_namespaces
from tests.test_comm import SPANNING

PAIR = ["configs/quickstart/foe.yaml", "configs/quickstart/moe.yaml"]
SMALL = ["model.num_layers=2", "model.seq_length=32", *SPANNING]
ROWS = [(4, 16), (8, 16), (4, 24), (8, 24)]
# copies per token: quickstart k = 2 of 8 experts; FoE: 2 clusters, each k_c = 1
TOPK = {"moe": 2, "foe": 2}


def latency(tmp_path, *extra: str, source: tuple[str, ...] = ("--pair", *PAIR),
            batch: tuple[str, ...] = ("4", "8"), prompt: tuple[str, ...] = ("16", "24"),
            small: list[str] = SMALL) -> dict:
    out = tmp_path / "lat.json"
    cmd = [sys.executable, "-m", "foe_train.cli", "latency", *source, "--nproc", "4",
           "--batch", *batch, "--prompt-len", *prompt, "--gen-len", "3", "--reps", "1",
           "--json", "--out", str(out), *extra, *small]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def check_imbalance(row: dict, kind: str, topk: int, layers: int = 2) -> None:
    """Every copy the routers sent is received by exactly one rank, once per MoE layer."""
    load = row[kind]["imbalance"]
    assert len(load["copies"]) == layers and len(load["per_layer"]) == layers
    for copies, ratio in zip(load["copies"], load["per_layer"], strict=True):
        assert len(copies) == 4
        assert sum(copies) == row["batch"] * row["prompt_len"] * topk
        assert ratio == max(copies) / (sum(copies) / 4) >= 1
    assert load["max_over_mean"] == sum(load["per_layer"]) / layers


def check_rows(report: dict, rows: list[tuple[int, int]] = ROWS,
               topk: dict[str, int] = TOPK) -> None:
    assert [(r["batch"], r["prompt_len"]) for r in report["rows"]] == rows
    for r in report["rows"]:
        for kind in ("foe", "moe"):
            for metric in ("forward", "ttft", "tbt", "tokens_per_s"):
                assert r[kind][metric]["median"] > 0 and r[kind][metric]["p90"] > 0
            check_imbalance(r, kind, topk[kind])
        assert set(r["ratio"]) == {"forward", "ttft", "tbt"} and min(r["ratio"].values()) > 0
        for metric, rep in r["per_rep"].items():  # --reps 1: the one repetition's ratio
            if metric != "tbt":
                assert rep["median"] == pytest.approx(r["ratio"][metric])
            assert 0 < rep["p10"] <= rep["median"] <= rep["p90"] and rep["wins"] in (0, 0.5, 1)
        assert any(k.startswith("all_to_all@ep") for k in r["moe"]["comm"])
        assert all(not k.startswith("all_to_all@") or k == "all_to_all@cluster_ep"
                   for k in r["foe"]["comm"])


def check_prefill_sums(report: dict) -> None:
    """FoE's federated sums in a prefill carry every layer's sums of all the rank's tokens and
    a fold of only each sequence's last position (the one the head reads): the bytes
    bench.comm_model predicts, counted from the real calls."""
    cfg = load_config(PAIR[0], SMALL)
    for r in report["rows"]:
        seqs = r["batch"] // 2  # (D, C, L) = (1, 2, 2): two token shards
        predicted = predict(cfg.model, cfg.parallel, 4, report["nodes"],
                            seqs * r["prompt_len"], head_tokens=seqs)["all_reduce"]
        counted = r["foe"]["comm"]["all_reduce@federation"]
        assert (counted["bytes"], counted["calls"]) == (predicted["bytes"], predicted["calls"])
        assert counted["cross_node_bytes"] == predicted["cross_node_bytes"]


def test_latency_one_node(tmp_path):
    report = latency(tmp_path)
    assert report["nodes"] == 1 and report["world_size"] == 4
    foe = report["members"]["foe"]
    assert foe["weights"] == "random"
    assert foe["parallel"] == {**foe["parallel"], "data": 1, "clusters": 2,
                               "ranks_per_cluster": 2}
    check_rows(report)
    check_prefill_sums(report)


def test_latency_from_checkpoints_one_rank_per_cluster_is_balanced(tmp_path):
    """Trained weights of both members; an FoE cluster on one rank can only route to that
    rank's experts, so every rank receives the same load, while the trained baseline's
    routers do not spread evenly."""
    runs = {}
    for kind, layout in (("moe", []), ("foe", ["parallel.clusters=4",
                                               "parallel.ranks_per_cluster=1",
                                               "model.moe_router_topk=4"])):
        runs[kind] = tmp_path / kind
        train = subprocess.run(
            [shutil.which("foe-train"), "--config",
             f"configs/quickstart/{kind}.yaml", "--nproc", "4", *SMALL, *layout,
             "training.train_iters=3", "training.warmup_iters=1", "training.eval_iters=1",
             "training.micro_batch_size=1", "training.global_batch_size=4",
             f"logging.run_dir={runs[kind]}"],
            capture_output=True, text=True, timeout=600)
        assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-2000:]
    report = latency(tmp_path, source=("--checkpoints", str(runs["foe"]), str(runs["moe"])),
                     batch=("4",), prompt=("16",), small=[])
    for kind in ("foe", "moe"):
        assert report["members"][kind]["weights"] == str(runs[kind] / "checkpoints/iter_0000003")
    assert report["members"]["foe"]["parallel"]["clusters"] == 4
    check_rows(report, [(4, 16)], {"moe": 2, "foe": 4})  # FoE: 4 clusters x k_c = 1
    row = report["rows"][0]
    assert row["foe"]["imbalance"]["max_over_mean"] == 1.0
    assert row["moe"]["imbalance"]["max_over_mean"] > 1.0


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                    reason="emulated nodes need root and iproute2")
def test_latency_two_emulated_nodes(tmp_path):
    before = set(leftover_namespaces())
    report = latency(tmp_path, "--nodes", "2", "--link-rate", "1gbit")
    assert report["nodes"] == 2
    check_rows(report)
    check_prefill_sums(report)
    moe_cross = [r["moe"]["comm"]["all_to_all@ep"]["cross_node_bytes"] for r in report["rows"]]
    assert min(moe_cross) > 0
    assert all(r["foe"]["comm"].get("all_to_all@cluster_ep", {}).get("cross_node_bytes", 0) == 0
               for r in report["rows"])
    assert set(leftover_namespaces()) == before


def test_latency_refuses_bad_batch_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "foe_train.cli", "latency", "--pair", *PAIR, "--nproc", "4",
         "--prompt-len", "200", "--gen-len", "3", *SMALL], capture_output=True, text=True,
        timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "model.seq_length=32" in proc.stderr


def test_table_speedups_read_the_same_way_for_times_and_throughput():
    """> 1 means the first member is faster on every line: the MoE's time over FoE's, and
    FoE's tokens/s over the MoE's."""
    from foe_train.bench.latency import format_table

    def member(seconds: float, tokens_per_s: float) -> dict:
        timed = {key: {"median": seconds} for key in ("forward", "ttft", "tbt")}
        return {**timed, "tokens_per_s": {"median": tokens_per_s}, "comm": {},
                "imbalance": {"max_over_mean": 1.0}}

    row = {"batch": 4, "prompt_len": 16, "per_rep": {},
           "foe": member(0.5, 40.0), "moe": member(1.0, 20.0)}
    lines = format_table([row], ("foe", "moe")).splitlines()
    assert "foe speedup" in lines[0]
    speedups = {line.split()[2]: float(line.split()[-1]) for line in lines[1:5]}
    assert speedups == {"forward": 2.0, "ttft": 2.0, "tbt": 2.0, "tokens_per_s": 2.0}
