"""Identical-budget arithmetic (docs/design.md §1): hand counts, the real built models' parameter
counts, and the foe-budget CLI on the shipped recipe pairs."""

import json
import os
import subprocess

import pytest

from foe_train.budget import budget, compare, format_side_by_side
from foe_train.cli import budget_main
from foe_train.config import RecipeConfig
from launch.torchrun import torchrun_commands

# d=8, H=2 heads, G=2 KV heads (dh=4), E=4 experts of f=4, top-2, dense F=16, V=16, s=10,
# layer 0 MoE, layer 1 dense, swiglu, untied output.
HAND = {
    "model": {
        "num_layers": 2, "moe_layer_freq": [1, 0], "hidden_size": 8, "num_attention_heads": 2,
        "num_query_groups": 2, "ffn_hidden_size": 16, "num_experts": 4, "moe_ffn_hidden_size": 4,
        "moe_router_topk": 2, "vocab_size": 16, "seq_length": 10,
    },
    "parallel": {"clusters": 2},
    "training": {"train_iters": 5, "warmup_iters": 1, "global_batch_size": 4},
}


def recipe(base: dict, kind: str, **model: object) -> RecipeConfig:
    return RecipeConfig.model_validate({**base, "model": {**base["model"], "kind": kind, **model}})


def test_hand_count_moe_and_foe():
    # attention per layer: q 8x8=64, k 8x8=64, v 8x8=64, proj 8x8=64          -> 256
    # router 4x8 = 32; one swiglu expert: fc1 8->8 = 64, fc2 4->8 = 32          -> 96
    # dense swiglu MLP: fc1 8->32 = 256, fc2 16->8 = 128                         -> 384
    # output layer 16x8 = 128 (embedding table 128 is a lookup: not active, no FLOPs)
    # active matmul weights: layer 0: 256 + 32 + 2*96 = 480; layer 1: 256 + 384 = 640;
    #   + output 128 = 1248  -> 6*1248 = 7488 FLOPs
    # attention scores+values, full (non-causal): QK^T 10*8 MACs + AV 10*8 MACs = 320 FLOPs
    #   forward per layer, x3 for training = 960, 2 layers = 1920
    # flops/token = 7488 + 1920 = 9408 (FoE: C*k_c = 2*1 = 2 experts, the same)
    # total MoE: embedding 128 + output 128 + final norm 8 + norms 2*8*2 layers = 32
    #   + attention 2*256 = 512 + router 32 + experts 4*96 = 384 + dense 384 = 1608
    # FoE C=2: norms 2*8*2 clusters*2 layers = 64 (32 more) -> 1640
    # active: 1248 + norms (MoE 32 + 8 = 40 -> 1288; FoE 64 + 8 = 72 -> 1320)
    # tokens: 5 iters * 4 sequences * 10 = 200
    moe, foe = budget(recipe(HAND, "moe")), budget(recipe(HAND, "foe"))
    assert moe["flops_per_token"] == foe["flops_per_token"] == 9408
    assert (moe["total_params"], foe["total_params"]) == (1608, 1640)
    assert (moe["cluster_norm_params"], foe["cluster_norm_params"]) == (0, 32)
    assert (moe["active_params_per_token"], foe["active_params_per_token"]) == (1288, 1320)
    assert moe["tokens"] == foe["tokens"] == 200
    assert compare(moe, foe) == []


def test_hand_count_variants():
    # FoE with k_c = 2: C*k_c = 4 experts active, 2 more than the baseline's k = 2:
    #   +2*96 = 192 active weights -> +6*192 = 1152 FLOPs: 9408 + 1152 = 10560
    wide = budget(recipe(HAND, "foe", cluster_topk=2))
    assert wide["flops_per_token"] == 10560
    # no swiglu, tied output: expert 4x8 + 8x4 = 64, dense 16x8 + 8x16 = 256, no output copy
    # total MoE: 128 + 8 + 32 + 512 + 32 + 4*64 + 256 = 1224
    # active matmuls: 256+32+2*64 + 256+256 + output 128 (the tied table) = 1056
    #   -> 6*1056 + 1920 = 8256
    plain = budget(recipe(HAND, "moe", swiglu=False, untie_embeddings=False))
    assert plain["total_params"] == 1224
    assert plain["flops_per_token"] == 8256


# One dense layer (moe_layer_freq [1, 0]) so both MLP kinds are checked against megatron-core.
TINY = {
    "num_layers": 2, "moe_layer_freq": [1, 0], "hidden_size": 32, "num_attention_heads": 4,
    "num_query_groups": 2, "ffn_hidden_size": 64, "num_experts": 4, "moe_ffn_hidden_size": 16,
    "moe_router_topk": 2, "vocab_size": 64, "seq_length": 16,
}
BUILT = [
    {"model": {**TINY, "kind": "foe"}, "parallel": {"clusters": 2}},
    {"model": {**TINY, "kind": "moe"}, "parallel": {"expert_parallel": 2}},
    {"model": {**TINY, "kind": "foe", "swiglu": False, "untie_embeddings": False},
     "parallel": {"clusters": 2}},
    {"model": {**TINY, "kind": "moe", "swiglu": False, "untie_embeddings": False},
     "parallel": {"expert_parallel": 2}},
]


def test_total_params_equal_built_models(tmp_path):
    out = tmp_path / "counts.json"
    (cmd,) = torchrun_commands("tests.budget_worker",
                               ["--recipes", json.dumps(BUILT), "--out", str(out)], nproc=2)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    counts = json.loads(out.read_text())
    budgets = [budget(RecipeConfig.model_validate(r)) for r in BUILT]
    assert counts == [b["total_params"] for b in budgets]
    for foe, moe in ((budgets[0], budgets[1]), (budgets[2], budgets[3])):
        assert foe["total_params"] - moe["total_params"] == foe["cluster_norm_params"] == 128


def test_compare_refuses_any_difference_but_the_norm_exception():
    a = budget(recipe(HAND, "moe"))
    assert compare(a, dict(a)) == []
    # no tolerance: one FLOP or one token more is a different budget
    assert compare(a, {**a, "flops_per_token": a["flops_per_token"] + 1}) == ["flops_per_token"]
    assert compare(a, {**a, "tokens": a["tokens"] * 1.005}) == ["tokens"]
    # FoE-like: extra params in total and active are exactly its per-cluster norms -> excepted
    foe_like = {**a, "total_params": a["total_params"] + 5000,
                "active_params_per_token": a["active_params_per_token"] + 5000,
                "cluster_norm_params": 5000}
    assert compare(a, foe_like) == []
    assert compare(a, {**a, "total_params": a["total_params"] + 5000}) == ["total_params"]
    other_lr = {**a, "optimizer": {**a["optimizer"], "lr": 1e-3}}
    assert compare(a, other_lr) == ["optimizer"]
    rows = format_side_by_side("A", a, "B", other_lr, ["optimizer"]).splitlines()
    assert [r.split()[1] for r in rows if r.startswith("!")] == ["optimizer.lr"]
    assert rows[-1].split()[:3] == ["excepted:", "cluster_norm_params", "0"]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        budget_main(list(argv))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


@pytest.mark.parametrize("pair", ["quickstart", "paper", "bench"])
def test_cli_shipped_pairs_match(capsys, pair):
    a, b = f"configs/{pair}/foe.yaml", f"configs/{pair}/moe.yaml"
    code, out, _ = run_cli(capsys, a, b)
    assert code == 0, out
    header = out.splitlines()[0]
    assert a in header and b in header
    assert "!" not in out and "identical-budget pair" in out.splitlines()[-1]


@pytest.mark.parametrize("override, fields", [
    ("training.train_iters=300", {"tokens", "lr_schedule"}),
    ("model.moe_router_topk=4", {"active_params_per_token", "flops_per_token"}),
    # 8 more vocabulary rows: every number under 0.2% apart, still not the same budget
    ("model.vocab_size=272", {"total_params", "active_params_per_token", "flops_per_token"}),
])
def test_cli_mismatched_pair(capsys, override, fields):
    code, out, _ = run_cli(capsys, "configs/quickstart/foe.yaml", "configs/quickstart/moe.yaml",
                           "--set-b", override)
    assert code == 1
    flagged = {line.split()[1].split(".")[0] for line in out.splitlines() if line[0] == "!"}
    assert flagged == fields
    assert all(f in out.splitlines()[-1] for f in fields)


@pytest.mark.parametrize("args", [
    ["configs/quickstart/nope.yaml", "configs/quickstart/moe.yaml"],
    ["configs/quickstart/foe.yaml", "configs/quickstart/moe.yaml", "--set-b", "model.kind=dense"],
    ["configs/quickstart/foe.yaml", "configs/quickstart/moe.yaml", "--set-a",
     "parallel.clusters=3"],
])
def test_cli_bad_recipe(capsys, args):
    code, out, err = run_cli(capsys, *args)
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
