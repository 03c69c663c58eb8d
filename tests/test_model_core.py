"""Model core on real gloo process groups: FoE and the baseline against the pure-PyTorch
oracle (forward and every gradient), C = 1 equivalence, shared weights in sync, parameter
budget. One torchrun launch per world size runs all topologies of that size."""

import json

import pytest

from launch.torchrun import run_local

# (processes, nodes): the 4-rank launch runs as 2 torchrun agents (2 emulated nodes), so
# (1,4,1) sums two-level (two clusters per node) while (2,2,1) keeps its federations on one node
LAUNCHES = {
    (1, 1): ["--foe", "1,1,1", "--moe", "1", "--same-function"],
    (2, 1): ["--foe", "1,2,1", "--moe", "2"],
    (4, 2): ["--foe", "1,4,1", "1,2,2", "2,2,1", "1,2,2:allgather", "--moe", "4", "4:allgather"],
}


@pytest.fixture(scope="module", params=sorted(LAUNCHES))
def results(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("core") / "results.json"
    nproc, nodes = request.param
    code = run_local("tests.dist_checks", [*LAUNCHES[request.param], "--out", str(out)],
                     nproc, nodes, timeout=600, env={"OMP_NUM_THREADS": "1"})
    assert code == 0
    return json.loads(out.read_text())


def test_oracle_equivalence_forward_and_backward(results):
    checked = 0
    for name, per_mode in results.items():
        for mode, r in per_mode.items():
            if not isinstance(r, dict) or "logits_rel" not in r or name == "same_function":
                continue
            assert r["logits_rel"] <= 1e-5, (name, mode, r["logits_rel"])
            assert abs(r["loss"] - r["ref_loss"]) <= 1e-5 * abs(r["ref_loss"]), (name, mode)
            assert r["grad_rel_max"] <= 1e-4, (name, mode, r["grad_rel_max"])
            assert r["grads_checked"] >= 20
            # megatron's clipping norm, on every rank, is the norm of the whole model's
            # gradient: cluster weights once per cluster, shared weights once
            assert r["grad_norm_rel"] <= 1e-5, (name, mode, r["grad_norm_rel"])
            checked += 1
    assert checked >= 3


def test_activation_recompute_matches_the_oracle(results):
    """Recomputed layers (training.recompute) carry the pending MoE output between them and
    still give the oracle's logits and gradients (asserted with the rest above)."""
    foe = [name for name in results if name.startswith("foe:") and ":" not in name[4:]]
    checked = [name for name in foe if "logits_rel" in results[name].get("recompute", {})]
    assert checked == foe and foe


def test_embedding_sums_its_gradient_on_the_smaller_tensor(results):
    """The oracle gradients above cover both ways an untied embedding sums its shares: the
    table's gradient (V = 32 rows < 64 tokens at (1,4,1)) and the tokens' (32 at (1,2,2))."""
    ways = {name: r["embedding_sum"] for name, r in results.items() if name.startswith("foe:")}
    if "foe:1,4,1" in ways:
        assert ways["foe:1,4,1"] == "table" and ways["foe:1,2,2"] == "tokens", ways


def test_two_level_sum_ran_where_clusters_share_nodes(results):
    """On 2 nodes x 2 ranks, (1,4,1) puts two clusters of each federation on a node: its
    sums (checked against the oracle above) are two-level; the others stay flat."""
    if results["launch"]["nodes"] == 1:
        assert not any(r.get("two_level") for n, r in results.items() if n != "launch")
        return
    assert results["foe:1,4,1"]["two_level"]
    assert not results["foe:1,2,2"]["two_level"] and not results["foe:2,2,1"]["two_level"]


def test_shared_parameters_identical_after_steps(results):
    for name, per_mode in results.items():
        for mode, r in per_mode.items():
            if isinstance(r, dict) and "shared_identical" in r:
                assert r["shared_identical"], (name, mode)
                assert "decoder.final_layernorm.weight" in r["shared_params"]
                clusters = int(name.split(",")[1]) if name.startswith("foe:") else 1
                split = {"output_layer.weight"} if clusters > 1 else set()
                assert set(r["split_params"]) == split, name
                assert "embedding.word_embeddings.weight" in r["shared_params"], name


def test_split_head_costs_what_the_baseline_does(results):
    """Per rank, FoE's output layer does the baseline's multiply-adds (not C times: each
    cluster scores V/C of the vocabulary for its federation's C-times-larger token shard), and
    holds 1/C of the output weights instead of a copy (the embedding lookup stays whole)."""
    checked = 0
    for name, r in results.items():
        if name.startswith("foe:") and "head_foe" in r:
            clusters = int(name.split(",")[1])
            foe, moe = r["head_foe"], r["head_moe"]
            assert foe["output_macs"] == moe["output_macs"], (name, foe, moe)
            d, vocab = 32, 32
            assert moe["outside_layers_numel"] == 2 * vocab * d + d
            assert foe["outside_layers_numel"] == vocab * d + vocab * d // clusters + d, name
            checked += 1
    assert checked >= 1


def test_parameter_budget_differs_by_cluster_norms(results):
    for name, r in results.items():
        if name.startswith("foe:") and "params_foe" in r:
            clusters = int(name.split(",")[1])
            d, layers = 32, 3
            assert r["params_foe"] - r["params_moe"] == 2 * (clusters - 1) * d * layers


def test_c1_foe_equals_baseline(results):
    if "same_function" not in results:
        pytest.skip("checked in the single-rank launch")
    r = results["same_function"]
    assert r["same_names"] and r["logits_rel"] <= 1e-6 and r["grad_rel_max"] <= 1e-6


def test_gloo_reduce_scatter_sends_each_rank_its_chunk(results):
    """foe_train.compat: on gloo a reduce-scatter (the allgather dispatcher's combine, the
    two-level sum's first step) is one all-to-all of the input and a local sum, the bytes of a
    reduce-scatter, where gloo's own all-reduces the whole input."""
    r = results["reduce_scatter"]
    assert r["equal"] and r["all_to_all_inputs"] == [[3 * r["world"], 2]]


def test_gloo_small_all_reduce_is_one_gather(results):
    """foe_train.compat: on gloo a small all-reduce (a decode step's federated sum) is one
    all-gather and a local sum; a large one, or one queued in a coalescing manager, stays
    gloo's; all are the sum over ranks."""
    r = results["small_all_reduce"]
    assert r["small_equal"] and r["large_equal"] and r["queued_equal"] and r["gathers"] == [6]
