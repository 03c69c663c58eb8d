"""foe-bench latency end to end: the table/JSON for a recipe pair on one node and on two
emulated nodes with a capped link (then nothing of the emulation is left)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from launch.netns import leftover_namespaces

PAIR = ["configs/quickstart/foe.yaml", "configs/quickstart/moe.yaml"]
SMALL = ["model.num_layers=2", "model.seq_length=32"]


def latency(tmp_path, *extra: str) -> dict:
    out = tmp_path / "lat.json"
    cmd = [sys.executable, "-m", "foe_train.cli", "latency", "--pair", *PAIR, "--nproc", "4",
           "--batch", "4", "8", "--prompt-len", "16", "24", "--gen-len", "3", "--reps", "1",
           "--json", "--out", str(out), *extra, *SMALL]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def check_rows(report: dict) -> None:
    rows = report["rows"]
    assert [(r["batch"], r["prompt_len"]) for r in rows] == [(4, 16), (8, 16), (4, 24), (8, 24)]
    for r in rows:
        for kind in ("foe", "moe"):
            for metric in ("forward", "ttft", "tbt", "tokens_per_s"):
                assert r[kind][metric]["median"] > 0 and r[kind][metric]["p90"] > 0
        assert set(r["ratio"]) == {"forward", "ttft", "tbt"} and min(r["ratio"].values()) > 0
        assert any(k.startswith("all_to_all@ep") for k in r["moe"]["comm"])
        assert all(not k.startswith("all_to_all@") or k == "all_to_all@cluster_ep"
                   for k in r["foe"]["comm"])


def test_latency_one_node(tmp_path):
    report = latency(tmp_path)
    assert report["nodes"] == 1 and report["world_size"] == 4
    check_rows(report)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                    reason="emulated nodes need root and iproute2")
def test_latency_two_emulated_nodes(tmp_path):
    before = set(leftover_namespaces())
    report = latency(tmp_path, "--nodes", "2", "--link-rate", "1gbit")
    assert report["nodes"] == 2
    check_rows(report)
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
