"""foe-bench comm end to end: real torchrun agents (two of them for two nodes, c10d
rendezvous, so node identity is torchrun's), counted bytes vs the design §3 formulas."""

import json
import subprocess
import sys

import pytest

from foe_train.bench.comm_model import predict
from foe_train.bench.comm_run import cross_node_per_token, table
from foe_train.cli import bench_main
from foe_train.config import load_config
from tests.test_cli_input import refused

# the quickstart pair laid out across nodes: FoE clusters of two ranks (one per node on 2 nodes),
# the baseline's EP over all four ranks
SPANNING = ["parallel.data=1", "parallel.ranks_per_cluster=2", "parallel.expert_parallel=4"]
SMALL = ["model.num_layers=2", "model.seq_length=32", *SPANNING]


def comm(tmp_path, recipe: str, nproc: int, nodes: int, *overrides: str,
         baseline: bool = False) -> dict:
    """The report of one foe-bench comm run; with ``baseline`` the quickstart MoE is counted
    too, and its report is under "baseline" (and foe-bench's stdout under "stdout")."""
    out, base_out = tmp_path / "comm.json", tmp_path / "baseline.json"
    paired = ["--baseline", "configs/quickstart/moe.yaml", "--baseline-out", str(base_out)]
    cmd = [sys.executable, "-m", "foe_train.cli", "comm", "--config",
           f"configs/quickstart/{recipe}.yaml", "--nproc", str(nproc), "--nodes", str(nodes),
           "--backward", "--out", str(out), *(paired if baseline else []), *SMALL, *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    if baseline:
        report["stdout"] = proc.stdout
        report["baseline"] = json.loads(base_out.read_text())
        return report
    assert proc.stdout == table(report) + "\n"
    verdict = "yes" if report["counted"] == report["predicted"] else "NO"
    assert proc.stdout.endswith(f"counted == predicted: {verdict}\n")
    return report


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("comm")


def test_foe_one_rank_per_cluster_has_no_all_to_all(tmp):
    """Two clusters per node on 2 nodes, but each sum (32 tokens x d=128 x 4 B = 16 KiB) is
    below parallel.two_level_min_bytes: one flat all-reduce each, as predicted."""
    r = comm(tmp, "foe", 4, 2, "parallel.clusters=4", "parallel.ranks_per_cluster=1",
             "model.cluster_topk=1", "model.residual_sync=post_attention_and_moe",
             "model.moe_layer_freq=[1,0]", "model.vocab_size=16")
    assert "all_to_all" not in r["counted"] and r["dispatcher"] == "single-rank"
    assert r["counted"] == r["predicted"]
    # over the 4-cluster federation (a ring sends 1.5x the tensor): two sums per layer
    # forward; backward, every sum but the last and the split output layer's input gradient
    # (32 tokens x d=128 x 4 B each), and the embedding's gradient shares, summed on its
    # table (16 rows < 32 tokens)
    assert r["counted"]["all_reduce"]["calls"] == 9
    assert r["counted"]["all_reduce"]["bytes"] == 1.5 * (8 * 32 + 16) * 128 * 4
    assert {tuple(c[:2]) for c in r["collectives"]} == {("all_reduce", "federation")}


def test_foe_two_clusters_per_node_sum_inside_the_node_first(tmp):
    r = comm(tmp, "foe", 4, 2, "parallel.clusters=4", "parallel.ranks_per_cluster=1",
             "model.cluster_topk=1", "parallel.two_level_min_bytes=0", baseline=True)
    assert r["counted"] == r["predicted"]
    foe = {k: v for k, v in r.items() if k not in ("stdout", "baseline")}
    assert r["stdout"].startswith(table(foe) + "\n" + table(r["baseline"]))
    foe_per_token = f"FoE {cross_node_per_token(r):,.0f}; MoE/FoE "
    last = r["stdout"].splitlines()[-1]
    assert last.startswith("cross-node bytes per token: MoE ") and foe_per_token in last
    assert last.endswith("(k/N = 2/2 = 1.00)")
    kinds = {tuple(c[:2]): c[2] for c in r["collectives"]}
    assert kinds[("reduce_scatter_tensor", "federation_local")] is False
    assert kinds[("all_gather_into_tensor", "federation_local")] is False
    assert kinds[("all_reduce", "federation_cross")] is True
    # per node, each two-level sum sends 2(N-1)/N * T*d*b across nodes (N = 2 nodes,
    # T = 32 tokens, d = 128, b = 4): 3 sums forward (2 layers + the fold), 4 backward (the
    # layers' attention sums, the output layer's input and the embedded tokens' gradients;
    # the fold's needs none)
    per_node = 2 * r["by_kind"]["all_reduce@federation_cross"]["cross_node_bytes"]
    assert per_node == 7 * 32 * 128 * 4 * 2 * (2 - 1) // 2
    assert r["by_kind"]["reduce_scatter@federation_local"]["cross_node_bytes"] == 0
    # the baseline (EP over the 4 ranks of both nodes): its all-to-all crosses nodes, to 2 of
    # each rank's 3 peers
    moe = r["baseline"]
    assert moe["dispatcher"] == "alltoall" and moe["counted"] == moe["predicted"]
    a2a = moe["counted"]["all_to_all"]
    assert a2a["cross_node_bytes"] > 0 and a2a["cross_node_bytes"] * 3 == a2a["bytes"] * 2
    assert ["all_to_all_single", "ep", True] in moe["collectives"]


def test_foe_clusters_on_nodes_keep_all_to_all_inside(tmp):
    r = comm(tmp, "foe", 4, 2)
    assert r["counted"] == r["predicted"]
    assert r["counted"]["all_to_all"]["calls"] > 0
    assert r["counted"]["all_to_all"]["cross_node_bytes"] == 0
    for op, kind, spans in r["collectives"]:
        if op.startswith("all_to_all"):
            assert kind == "cluster_ep" and not spans
    # only the federated sum crosses nodes
    assert r["counted"]["all_reduce"]["cross_node_bytes"] == r["counted"]["all_reduce"]["bytes"]


def test_auto_dispatcher_gathers_when_k_exceeds_the_group(tmp):
    """k = 8 > P = 4 ranks: allgather + reduce-scatter sends fewer bytes than alltoall; the
    counted bytes of that dispatcher equal its formula, and the report names it."""
    r = comm(tmp, "moe", 4, 2, "model.moe_router_topk=8")
    assert r["dispatcher"] == "allgather" and r["counted"] == r["predicted"]
    assert "all_to_all" not in r["counted"] and r["counted"]["reduce_scatter"]["calls"] > 0


def test_two_level_sum_from_its_threshold_on():
    """parallel.two_level_min_bytes: a sum of fewer bytes is predicted flat (one call), one of
    at least that many two-level, as Federation.all_reduce chooses at run time."""
    cfg = load_config("configs/quickstart/foe.yaml", ["parallel.data=1", "parallel.clusters=4",
                                                      "parallel.ranks_per_cluster=1",
                                                      "model.cluster_topk=1"])
    per_token = cfg.model.hidden_size * 4
    threshold = cfg.parallel.two_level_min_bytes
    assert threshold == 512 * 1024
    below = predict(cfg.model, cfg.parallel, 4, 2, threshold // per_token - 1)
    at = predict(cfg.model, cfg.parallel, 4, 2, threshold // per_token)
    assert set(below) == {"all_reduce"} and below["all_reduce"]["calls"] == 5
    assert set(at) == {"all_reduce", "reduce_scatter", "all_gather"}
    assert at["reduce_scatter"]["calls"] == at["all_gather"]["calls"] == 5


@pytest.mark.parametrize(("args", "message"), [
    (["--baseline", "configs/quickstart/foe.yaml"], "--baseline: give the FoE recipe as"),
    (["--baseline-out", "moe.json"], "--baseline-out: needs --baseline"),
    (["--nodes", "3"], "--nodes 3 must divide --nproc 4"),
])
def test_comm_refuses_in_one_line(args, message, monkeypatch, capsys):
    assert message in refused(bench_main, monkeypatch, capsys, "comm", "--config",
                              "configs/quickstart/foe.yaml", "--nproc", "4", *args)
