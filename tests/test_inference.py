"""KV-cached inference on real gloo process groups: cached decoding equals recomputing the
whole sequence (FoE in both residual_sync modes and MoE, several topologies), an FoE cluster
caches only its own KV heads, greedy and top-p generation are deterministic and the same on
every topology with the same weights; foe-generate end to end from a foe-train checkpoint."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from foe_train.config import ConfigError
from foe_train.infer.generate import Sampling, choose, main, shard_prompts
from foe_train.model import head
from launch.torchrun import torchrun_commands
from tests.cache_checks import LENGTH, PREFILL, SAMPLED_ROWS, SAMPLED_VOCAB, TINY

LAUNCHES = {
    1: ["--foe", "1,1,1", "--moe", "1"],
    4: ["--foe", "1,2,2", "2,2,1", "1,4,1", "--moe", "4"],
}
TINY_RECIPE = str(Path(__file__).parent / "recipes" / "tiny.yaml")
GENERATE = [sys.executable, "-m", "foe_train.infer.generate"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Both launches at once (the one-rank launch fits beside the four-rank one)."""
    runs = []
    for nproc, args in LAUNCHES.items():
        out = tmp_path_factory.mktemp("infer") / "results.json"
        (cmd,) = torchrun_commands("tests.cache_checks", [*args, "--out", str(out)],
                                   nproc=nproc)
        runs.append((out, subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.PIPE, text=True, env=ENV)))
    merged = {}
    for out, proc in runs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-4000:]
        merged.update(json.loads(out.read_text()))
    return merged


def _all(results):
    for name, per_mode in results.items():
        for mode, r in per_mode.items():
            yield name, mode, r


def test_cached_decoding_matches_full_recompute(results):
    assert sorted(results) == ["foe:1,1,1", "foe:1,2,2", "foe:1,4,1", "foe:2,2,1", "moe:1",
                               "moe:4"]
    for name, mode, r in _all(results):
        # prefill plus every decode step, each against the full forward's last position
        assert r["steps_checked"] == 1 + LENGTH - PREFILL, (name, mode)
        assert r["max_rel_error"] <= 1e-5, (name, mode, r["max_rel_error"])


def test_overlapped_halves_compute_what_whole_batches_do(results):
    """parallel.overlap_min_bytes = 0: every layer of a batch of two or more sequences runs on
    two halves, each half's federated sum started on the sending thread; the logits, the
    cached decoding and greedy generation are those of whole-batch sums, and every QKV
    projection reads a contiguous input (a strided half is a slower batched matmul)."""
    checked = 0
    for name, mode, r in _all(results):
        if name.startswith("foe:") and name != "foe:1,1,1" and mode == "post_attention":
            o = r["overlap"]
            assert o["halves_summed"] > 0, name
            assert o["full_rel"] <= 1e-5 and o["max_rel_error"] <= 1e-5, (name, o)
            assert o["same_greedy"], name
            assert o["qkv_inputs_contiguous"], name
            checked += 1
    assert checked == 3


def test_foe_cluster_caches_only_its_kv_heads(results):
    groups = TINY["num_query_groups"]
    head_dim = TINY["hidden_size"] // TINY["num_attention_heads"]
    for name, mode, r in _all(results):
        clusters = int(name.split(",")[1]) if name.startswith("foe:") else 1
        for shapes, batch in zip(r["cache_shapes"], r["local_batch"], strict=True):
            assert sorted(shapes) == ["1", "2", "3"], (name, mode)
            for key, value in shapes.values():
                assert key == value == [LENGTH, batch, groups // clusters, head_dim], (name, mode)


def test_generation_deterministic_and_equal_to_recompute(results):
    for name, mode, r in _all(results):
        assert r["greedy_equals_recompute"], (name, mode)
        assert r["greedy_repeat_equal"] and r["top_p_repeat_equal"], (name, mode)
        assert r["same_on_all_ranks"], (name, mode)
        assert r["greedy"] != r["top_p"], (name, mode)


def test_generation_identical_across_topologies(results):
    # same seed, same weights: init is keyed by global names, whatever D and L are
    for mode in ("post_attention", "post_attention_and_moe"):
        a, b = results["foe:1,2,2"][mode], results["foe:2,2,1"][mode]
        assert a["greedy"] == b["greedy"] and a["top_p"] == b["top_p"], mode
    a, b = results["moe:1"]["moe"], results["moe:4"]["moe"]
    assert a["greedy"] == b["greedy"] and a["top_p"] == b["top_p"]
    # C = 1: the two residual_sync modes are the same function
    c1 = results["foe:1,1,1"]
    assert c1["post_attention"]["greedy"] == c1["post_attention_and_moe"]["greedy"]
    # and the clusters do matter: C = 2 and C = 4 are different models
    assert results["foe:1,2,2"]["post_attention"]["greedy"] != \
        results["foe:1,4,1"]["post_attention"]["greedy"]


def test_split_sampling_draws_what_the_whole_logits_draw(results):
    """Top-p sampling on the vocabulary shards of C = 1, 2, 4 draws, on every rank, the ids the
    whole logits draw with the same uniforms, and gathers only the shards' masses (top-p 1),
    masses and NUCLEUS_CANDIDATES candidates (a peaked nucleus) or, when the candidates
    cannot hold the nucleus, those and then the logits."""
    rows, k = SAMPLED_ROWS, head.NUCLEUS_CANDIDATES
    for name in ("foe:1,1,1", "foe:1,2,2", "foe:2,2,1", "foe:1,4,1"):
        clusters = int(name.split(",")[1])
        width = SAMPLED_VOCAB // clusters
        expected = {"by_id": [2 * rows], "candidates": [(2 + 2 * k) * rows],
                    "whole": [(2 + 2 * k) * rows, (2 + width) * rows]}
        for rank in results[name]["post_attention"]["sampling"]:
            for case, r in rank.items():
                assert r["equal"] and r["distinct"] > 1, (name, case, r)
                assert r["gathered"] == (expected[case] if clusters > 1 else []), (name, case)


def test_sampling_frequencies_follow_the_nucleus():
    """Inverse-CDF draws from uniforms: each id as often as its probability within the nucleus
    (top-p 1: all of them; padding ids never)."""
    n = 100_000
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    logits = torch.log(probs).expand(n, -1)
    uniforms = torch.rand(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for top_p, nucleus in ((1.0, 4), (0.85, 3), (0.5, 1)):
        drawn = torch.bincount(head.sample(logits, None, uniforms, 1.0, top_p, 4), minlength=5)
        want = probs.clone()
        want[nucleus:] = 0
        assert (drawn / n - want / want.sum()).abs().max() < 0.01, (top_p, drawn)


def test_top_p_keeps_the_nucleus_and_the_vocabulary():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1, 0.0]])).expand(200, -1).clone()
    gens = [torch.Generator().manual_seed(i) for i in range(200)]
    active = torch.ones(200, dtype=torch.bool)

    def drawn(top_p: float, vocab_size: int | None = None) -> set[int]:
        sampling = Sampling(temperature=1.0, top_p=top_p)
        return set(choose(logits, sampling, gens, active, None, vocab_size).tolist())

    assert drawn(0.5) == {0}
    assert drawn(0.85) == {0, 1}
    assert drawn(1.0) == {0, 1, 2}
    assert drawn(1.0, vocab_size=2) == {0, 1}
    assert set(choose(logits, Sampling(), gens, active).tolist()) == {0}
    before = [g.get_state() for g in gens]
    choose(logits, Sampling(1.0, 1.0), gens, torch.zeros(200, dtype=torch.bool))
    assert all(g.get_state().equal(b) for g, b in zip(gens, before, strict=True))
    for bad in ({"top_p": 0.0}, {"top_p": 1.5}, {"temperature": -1.0}):
        with pytest.raises(ConfigError):
            Sampling(**bad)


def test_prompts_split_over_token_shards_in_equal_shares():
    topo = SimpleNamespace(token_shards=2, token_shard=1)
    assert shard_prompts([[1]] * 3, topo) == [2, 2]
    topo = SimpleNamespace(token_shards=4, token_shard=3)
    assert shard_prompts([[1]] * 2, topo) == [1]


def _generate(*args: str) -> subprocess.Popen:
    return subprocess.Popen([*GENERATE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV)


def _finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-4000:]
    return out


def test_foe_generate_from_a_foe_train_checkpoint(finished_run):
    prompts = ["--prompt", "Hello", "--prompt", "The quick brown fox", "--max-new-tokens", "8"]
    # the recipe's random initialisation (the same at any L), sampled, on 1 x 2 x 1 ranks
    fresh = _generate("--config", TINY_RECIPE, *prompts, "--nproc", "2", "--top-p", "0.9",
                      "--temperature", "0.8", "parallel.ranks_per_cluster=1")
    try:
        # the trained weights, loaded at another layout than the 1 x 2 x 2 they were saved at
        ckpt = finished_run[0] / "checkpoints" / "iter_0000008"
        proc = _generate("--checkpoint", str(ckpt), *prompts, "parallel.data=2",
                         "parallel.ranks_per_cluster=1")
        loaded, said = proc.communicate(timeout=600)
        assert proc.returncode == 0, said[-4000:]
        # it says which weights it loaded before generating (stdout stays the text alone)
        assert f"foe-generate: checkpoint {ckpt}, 4 processes, 2 prompt(s)" in said
        fresh_out = _finish(fresh)
    finally:
        if fresh.poll() is None:
            fresh.terminate()
            fresh.communicate()
    assert loaded.startswith("[0] Hello") and "\n[1] The quick brown fox" in loaded
    assert fresh_out.startswith("[0] Hello") and fresh_out != loaded


@pytest.mark.parametrize("args, field", [
    (["--checkpoint", "nowhere"], "--checkpoint"),
    (["--config", TINY_RECIPE, "--top-p", "1.5"], "--top-p"),
    (["--config", TINY_RECIPE, "--nproc", "3"], "parallel"),
], ids=["missing-checkpoint", "bad-top-p", "bad-layout"])
def test_foe_generate_refuses_bad_input_in_one_line(tmp_path, capsys, monkeypatch, args, field):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(SystemExit) as exc:
        main([*args, "--prompt", "hi"])
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"error: {field}") and err.count("\n") == 1, err
