"""foe-bench project's inputs beyond a balanced roofline: activation traffic (an FoE rank moves
the activations of its whole federation shard), the measured expert imbalance, megatron's
dispatcher host synchronisations, and a latency report set beside its projection. Every
expected number is worked out by hand in the comments, on the round-number TINY_HW."""

import json
from pathlib import Path

import pytest
import yaml

from foe_train.bench.projection import (
    HOST_SYNCS,
    Pass,
    comm_breakdown,
    compute_seconds,
    elementwise_elements,
    imbalance_from,
    load_hardware,
    project_main,
    project_member,
)
from foe_train.config import ModelConfig, ParallelConfig, RecipeConfig
from tests.test_projection import H100, TINY_HW, tiny


def with_model(cfg: RecipeConfig, **model: object) -> RecipeConfig:
    return cfg.model_copy(update={"model": cfg.model.model_copy(update=model)})


def refused(capsys: pytest.CaptureFixture, *argv: str) -> str:
    """project_main refusing: exit 2, nothing on stdout, one line on stderr."""
    with pytest.raises(SystemExit) as info:
        project_main(list(argv))
    out, err = capsys.readouterr()
    assert info.value.code == 2 and out == "", out + err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


def test_an_foe_rank_moves_its_whole_federation_shard():
    # One node of 2 GPUs, 2 prompts of 4 tokens: the FoE rank (C=2, L=1) holds the one token
    # shard, all 8 tokens; a baseline rank (EP=2) holds 4. post_attention_and_moe keeps FoE's
    # residual stream shaped like the baseline's (2 norms, 2 adds per layer).
    foe = with_model(tiny("foe"), residual_sync="post_attention_and_moe")
    step_foe, step_moe = Pass(2, 4, 0, False), Pass(1, 4, 0, False)
    world = 2
    foe_s = compute_seconds(foe.model, ParallelConfig(clusters=2), world, step_foe, TINY_HW)
    moe_s = compute_seconds(tiny("moe").model, ParallelConfig(clusters=2), world, step_moe,
                            TINY_HW)
    # per token, d = 8: norms 4d + adds 6d + embedding and final norm 4d = 14d = 112 for both;
    # FoE adds 2 federated sums (d in, d out each) = 4d = 32. FoE 8 * 144 = 1152 elements at
    # 1 B / 100 B/s -> 11.52 s; baseline 4 * 112 = 448 -> 4.48 s
    assert foe_s["elementwise"] == pytest.approx(11.52)
    assert moe_s["elementwise"] == pytest.approx(4.48)
    # without the sums, exactly C = 2 times the baseline rank's: same work per token, twice
    # the tokens
    assert foe_s["elementwise"] - 8 * 32 / 100 == pytest.approx(2 * moe_s["elementwise"])
    # the attention matmuls do the same FLOPs on both ranks (2*8*128 = 2*4*256 = 2048), yet
    # the FoE rank reads and writes 8 tokens' activations: 128 weights + 8*(2d + (6+4)*4) +
    # the K/V of 8 keys 2*4*8 = 640 -> 6.4 s; the baseline 256 + 4*(16 + 20*4) + 2*2*4*4 = 704
    assert foe_s["attention"] == pytest.approx(6.4)
    assert moe_s["attention"] == pytest.approx(7.04)
    # post_attention (the default) carries the pending MoE output and adds the residual inside
    # the sums (on the first member, the slowest): with 2 layers, layer 0: norms 4d, the term
    # h + a_c 3d; layer 1: norms 4d, s_c = h + m_c 3d, a_c + s_c 3d; 2 sums 4d; embedding 2d:
    # 23d per token; and per position the head reads, the final fold h + m_c 3d, its sum 2d
    # and the final norm 2d: 7d
    two = ModelConfig(kind="foe", num_layers=2, hidden_size=8, num_attention_heads=2,
                      num_query_groups=2, num_experts=4, moe_ffn_hidden_size=4,
                      moe_router_topk=2, vocab_size=16)
    assert elementwise_elements(two, 2) == (23 * 8, 7 * 8)
    assert elementwise_elements(two.model_copy(update={"kind": "moe"}), 1) == ((20 + 4) * 8, 0)
    # with a cache the head reads one position per sequence: the one-layer FoE above
    # (post_attention_and_moe) counts norms 4d, the attention's add 3d, its sum 2d and the
    # embedding 2d = 11d = 88 per token, and 7d = 56 per position the head reads: its forward
    # 8 * (88 + 56) = 1152 as above, its prefill 8 * 88 + 2 * 56 = 816 -> 8.16 s
    assert elementwise_elements(foe.model, 2) == (88, 56)
    prefill = compute_seconds(foe.model, ParallelConfig(clusters=2), world, Pass(2, 4, 0, True),
                              TINY_HW)
    assert prefill["elementwise"] == pytest.approx(8.16)


def test_imbalance_scales_the_slowest_ranks_experts_and_all_to_all():
    moe = tiny("moe")
    even = project_member(moe, TINY_HW, nodes=2, batch=4, prompt_len=4, gen_len=2)
    loaded = project_member(moe, TINY_HW, nodes=2, batch=4, prompt_len=4, gen_len=2,
                            imbalance=2.0)
    before, after = even["breakdown"]["forward"], loaded["breakdown"]["forward"]
    # EP=4, 4 tokens, k=2: the most loaded rank's expert gets 16 copies instead of 8: FLOPs
    # 2*16*96 = 3072 -> 3.072 s; 96 weights + 16*2*(8 + 12) = 736 -> 7.36 s (was 4.16)
    assert (before["compute"]["experts"], after["compute"]["experts"]) == pytest.approx(
        (4.16, 7.36))
    # dispatch: 8 copies sent, 16 received: permute 16, unpermute 8 + 4, buffers 2*(8 + 16):
    # 76 rows of 8 -> 6.08 s (was 60 rows, 4.8 s)
    assert after["compute"]["dispatch"] == pytest.approx(6.08)
    # all-to-all bytes double: 3*5 s + 80 B intra / 100 + 160 B cross / 10 = 31.8 s (was
    # 23.4); the counts' all-gather does not depend on routing
    assert after["comm"] == pytest.approx({"all_to_all": 31.8, "all_gather": 10.28})
    assert loaded["forward"] - even["forward"] == pytest.approx(3.2 + 1.28 + 8.4)
    # the allgather dispatcher's gathers and reduce-scatter have fixed sizes: no change
    gather = with_model(moe, token_dispatcher="allgather")
    args = (gather.model, ParallelConfig(), 4, 2, 4, TINY_HW)
    assert comm_breakdown(*args, imbalance=2.0) == comm_breakdown(*args)
    step = Pass(1, 4, 0, False)
    assert compute_seconds(gather.model, ParallelConfig(), 4, step, TINY_HW, 2.0)[
        "experts"] == pytest.approx(7.36)


def test_host_syncs_cost_their_latency_per_moe_layer():
    hw = TINY_HW.model_copy(update={"host_sync_latency": 0.5})
    a2a = with_model(tiny("foe"), token_dispatcher="alltoall")
    base = project_member(a2a, TINY_HW, nodes=1, batch=1, prompt_len=4, gen_len=2)
    priced = project_member(a2a, hw, nodes=1, batch=1, prompt_len=4, gen_len=2)
    # one MoE layer, alltoall dispatcher: 2 queue-draining syncs of 0.5 s in every pass
    assert HOST_SYNCS == {"alltoall": 2, "allgather": 3, "single-rank": 1}
    assert priced["breakdown"]["tbt"]["host_syncs"] == 2
    for metric in ("forward", "ttft", "tbt"):
        assert priced[metric] - base[metric] == pytest.approx(1.0)
    assert priced["generate"] - base["generate"] == pytest.approx(2.0)  # prefill + 1 step
    # megatron's allgather dispatcher (the baseline, EP = 2 on the node's 2 GPUs): 3 syncs; in
    # an expert group of one rank (the FoE cluster, L = 1) the single-rank dispatcher: 1
    gather = with_model(tiny("moe"), token_dispatcher="allgather")
    assert project_member(gather, hw, 1, 2, 4, 2)["breakdown"]["forward"][
        "host_sync_seconds"] == pytest.approx(1.5)
    single = with_model(tiny("foe"), token_dispatcher="allgather")
    assert project_member(single, hw, 1, 1, 4, 2)["breakdown"]["forward"][
        "host_sync_seconds"] == pytest.approx(0.5)
    # two layers, one of them dense: still one MoE layer's syncs; two MoE layers: twice
    dense = with_model(a2a, num_layers=2, moe_layer_freq=[1, 0])
    assert project_member(dense, hw, 1, 1, 4, 2)["breakdown"]["ttft"]["host_syncs"] == 2
    both = with_model(a2a, num_layers=2)
    assert project_member(both, hw, 1, 1, 4, 2)["breakdown"]["ttft"]["host_syncs"] == 4
    assert load_hardware(H100).host_sync_latency == pytest.approx(20e-6)


def write_pair(tmp: Path) -> tuple[list[str], str]:
    """The tiny FoE/MoE recipes and TINY_HW as files, for the command line."""
    paths = []
    for kind in ("foe", "moe"):
        path = tmp / f"{kind}.yaml"
        path.write_text(yaml.safe_dump({"model": tiny(kind).model.model_dump(),
                                        "parallel": {"clusters": 2}}))
        paths.append(str(path))
    hw = tmp / "tiny-hw.yaml"
    hw.write_text(yaml.safe_dump(TINY_HW.model_dump()))
    return paths, str(hw)


def latency_report(tmp: Path, world: int = 2, **loads: list[float]) -> str:
    """A foe-bench latency report with known medians: per row, FoE forward 10 s, MoE 20 s,
    ttft 10/15 s, tbt 1/1.5 s; the measured loads per member and row."""
    times = {"foe": (10.0, 10.0, 1.0), "moe": (20.0, 15.0, 1.5)}
    rows = []
    for i, batch in enumerate((2, 2)):
        row = {"batch": batch, "prompt_len": 4, "gen_len": 2}
        for name, (fwd, ttft, tbt) in times.items():
            row[name] = {m: {"median": v, "p90": v} for m, v in
                         (("forward", fwd), ("ttft", ttft), ("tbt", tbt))}
            row[name]["imbalance"] = {"max_over_mean": loads[name][i], "ranks": []}
        rows.append(row)
    report = {"rows": rows, "nodes": 1, "world_size": world,
              "members": {name: {"weights": "random",
                                 "parallel": {"data": 1, "clusters": 2, "ranks_per_cluster": 1,
                                              "expert_parallel": None}} for name in times}}
    path = tmp / "latency.json"
    path.write_text(json.dumps(report))
    return str(path)


def test_measured_beside_projected(tmp_path, capsys):
    pair, hw = write_pair(tmp_path)
    report = latency_report(tmp_path, foe=[1.0, 1.0], moe=[2.0, 1.0])
    project_main(["--pair", *pair, "--cluster", hw, "--measured", report, "--json"])
    rows = json.loads(capsys.readouterr().out)["rows"]
    # row 0, FoE (C=2, L=1, all 8 tokens): attention 6.4 + router 0.256 vs 144/100 = 1.44 +
    # experts 192 + 8*40 = 512 -> 5.12 + output 64 + 8*16 = 192 -> 1.92 + elementwise
    # 8*144 -> 11.52 + dispatch (allgather at P=1: 16 copies permuted + 8 unpermuted in,
    # 8 tokens out) 32 rows of 8 -> 2.56 = 28.96 s compute; 2 sums of 64 B inside the node:
    # 2 * 1 s + 128 / 100 = 3.28 s => 32.24 s
    foe, moe = rows[0]["foe"], rows[0]["moe"]
    assert foe["forward"]["projected"] == pytest.approx(32.24)
    assert foe["forward"]["rel_error"] == pytest.approx(32.24 / 10 - 1)
    # MoE (EP=2, 4 tokens per rank) at the row's measured load 2: attention 7.04, router 1.28,
    # experts 2 local: 192 + 16*40 = 832 -> 8.32, output 2.24, elementwise 4.48, dispatch
    # 24 + 4 + 2*(8 + 16) + 4*16 = 140 rows -> 11.2: 34.56 s; all-to-all 3 calls of 1 s +
    # 2 * 80 B / 100, counts' all-gather 1 s + 32 / 100: 5.92 s => 40.48 s
    assert (moe["imbalance"], moe["forward"]["projected"]) == pytest.approx((2.0, 40.48))
    assert rows[0]["ratio"]["forward"] == pytest.approx(
        {"measured": 2.0, "projected": 40.48 / 32.24, "paper": 5.2})
    assert rows[1]["moe"]["imbalance"] == 1.0  # each row its own measured load
    assert rows[1]["ratio"]["tbt"]["measured"] == pytest.approx(1.5)

    project_main(["--pair", *pair, "--cluster", hw, "--measured", report])
    table = capsys.readouterr().out
    # row 0 forward: FoE 10000 ms measured, 32240 projected (+222%), MoE 20000 and 40480
    # (+102%), measured ratio 2.00 beside the projection's 1.26 and the paper's 5.20
    line = next(s for s in table.splitlines() if s.lstrip().startswith("2      4  forward"))
    assert line.split() == ["2", "4", "forward", "10000.000", "32240.000", "+222%",
                            "20000.000", "40480.000", "+102%", "2.00", "1.26", "5.20"]
    assert "expert load max/mean 2.00" in table and "moe/foe meas" in table


def test_imbalance_options(tmp_path, capsys):
    pair, hw = write_pair(tmp_path)
    report = latency_report(tmp_path, foe=[1.0, 1.0], moe=[1.5, 3.0])
    # the median over rows: of two rows, their mean
    assert imbalance_from(report, ("foe", "moe")) == (1.0, 2.25)
    project_main(["--pair", *pair, "--cluster", hw, "--nodes", "2", "--batch", "4",
                  "--prompt-len", "4", "--gen-len", "2", "--imbalance-from", report])
    table = capsys.readouterr().out
    assert "foe 1.00, moe 2.25 (median over the rows of" in table
    # --imbalance follows the --pair order; the default says it is an assumption
    project_main(["--pair", *reversed(pair), "--cluster", hw, "--nodes", "2", "--batch", "4",
                  "--prompt-len", "4", "--gen-len", "2", "--imbalance", "2", "1", "--json"])
    row = json.loads(capsys.readouterr().out)["rows"][0]
    assert (row["moe"]["imbalance"], row["foe"]["imbalance"]) == (2.0, 1.0)
    assert row["moe"]["breakdown"]["forward"]["comm"]["all_to_all"] == pytest.approx(31.8)
    project_main(["--pair", *pair, "--cluster", hw, "--nodes", "1", "--batch", "2",
                  "--prompt-len", "4", "--gen-len", "2"])
    assert "foe 1.00, moe 1.00 (balanced, assumed" in capsys.readouterr().out
    err = refused(capsys, "--pair", *pair, "--cluster", hw, "--imbalance", "0.5", "1")
    assert "--imbalance 0.5 1" in err and "at least 1" in err


def test_unusable_reports_refused_in_one_line(tmp_path, capsys):
    pair, hw = write_pair(tmp_path)
    four = latency_report(tmp_path, world=4, foe=[1.0, 1.0], moe=[1.0, 1.0])
    err = refused(capsys, "--pair", *pair, "--cluster", hw, "--measured", four)
    assert "--measured" in err and "ran 4 ranks on 1 node(s)" in err
    assert "has 2 per node; pass the hardware YAML of the fabric it ran on" in err
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    for flag in ("--measured", "--imbalance-from"):
        err = refused(capsys, "--pair", *pair, "--cluster", hw, flag, str(broken))
        assert err.startswith(f"error: {flag}: cannot read a latency report from {broken}")
        assert "pass the JSON foe-bench latency --json/--out wrote" in err
    err = refused(capsys, "--pair", *pair, "--cluster", hw, "--measured",
                  str(tmp_path / "missing.json"))
    assert "--measured: cannot read" in err
    old = latency_report(tmp_path, foe=[1.0, 1.0], moe=[1.0, 1.0])
    data = json.loads(Path(old).read_text())
    del data["rows"][1]["moe"]["imbalance"]
    Path(old).write_text(json.dumps(data))
    err = refused(capsys, "--pair", *pair, "--cluster", hw, "--imbalance-from", old)
    assert "no moe.imbalance.max_over_mean" in err


def test_a_one_rank_expert_group_has_no_imbalance():
    """FoE with one rank per cluster: that rank's router can only pick its own experts, so a
    measured spread elsewhere (another layout, the baseline) does not apply to it."""
    foe = project_member(tiny("foe"), TINY_HW, nodes=1, batch=1, prompt_len=4, gen_len=2,
                         imbalance=1.5)
    assert foe["layout"]["ranks_per_cluster"] == 1 and foe["imbalance"] == 1.0
    assert foe["forward"] == project_member(tiny("foe"), TINY_HW, 1, 1, 4, 2)["forward"]


def test_a_recipe_passed_as_the_cluster_is_refused_in_one_line(tmp_path, capsys):
    # the error named the missing field but printed the whole recipe as the value it got
    pair, _ = write_pair(tmp_path)
    err = refused(capsys, "--pair", *pair, "--cluster", pair[0])
    assert err == (f"error: --cluster {pair[0]}: gpus_per_node: required and missing; add it "
                   f"(is this the right kind of file?)\n")
