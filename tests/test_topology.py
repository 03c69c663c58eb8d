"""Refusals of bad layouts and recipes: each is one line naming the field and the fix."""

import subprocess
import sys

import pytest

from foe_train.config import ConfigError, ModelConfig, ParallelConfig, load_config
from foe_train.topology import Grid, TopologyError, check_layout, consecutive_nodes
from tests.test_comm import SPANNING

MODEL = ModelConfig(num_query_groups=4, num_experts=8, moe_router_topk=2)


def refuse(model: ModelConfig, parallel: ParallelConfig, world: int, nodes: list[int]) -> str:
    with pytest.raises(TopologyError) as err:
        check_layout(model, parallel, world, nodes)
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_world_size_must_equal_d_c_l():
    msg = refuse(MODEL, ParallelConfig(data=1, clusters=2, ranks_per_cluster=1), 4, [0] * 4)
    assert msg.startswith("parallel:") and "1*2*1 = 2" in msg and "world size is 4" in msg


def test_clusters_must_divide_kv_heads():
    msg = refuse(MODEL, ParallelConfig(clusters=8), 8, [0] * 8)
    assert "parallel.clusters=8" in msg and "num_query_groups=4" in msg


def test_clusters_must_divide_experts():
    model = ModelConfig(num_query_groups=6, num_attention_heads=6, hidden_size=60, num_experts=8,
                        moe_router_topk=3, cluster_topk=1)
    msg = refuse(model, ParallelConfig(clusters=3), 3, [0] * 3)
    assert "parallel.clusters=3" in msg and "num_experts=8" in msg


def test_ranks_per_cluster_must_divide_cluster_experts():
    msg = refuse(MODEL, ParallelConfig(clusters=2, ranks_per_cluster=3), 6, [0] * 6)
    assert "parallel.ranks_per_cluster=3" in msg and "4 experts" in msg


def test_topk_must_split_over_clusters():
    model = ModelConfig(num_query_groups=4, num_experts=8, moe_router_topk=3)
    with pytest.raises(ConfigError, match=r"^model\.cluster_topk: .*set model\.cluster_topk"):
        check_layout(model, ParallelConfig(clusters=2), 2, [0, 0])


def test_cluster_must_not_span_nodes():
    msg = refuse(MODEL, ParallelConfig(clusters=2, ranks_per_cluster=2), 4, [0, 0, 0, 1])
    assert "ranks [2, 3] span nodes [0, 1]" in msg and "ranks_per_cluster" in msg


def test_cluster_per_node_is_accepted():
    check_layout(MODEL, ParallelConfig(clusters=2, ranks_per_cluster=2), 4, [0, 0, 1, 1])


def test_moe_expert_parallel_must_divide_experts():
    model = ModelConfig(kind="moe", num_experts=6, moe_router_topk=2)
    assert "parallel.expert_parallel=4" in refuse(model, ParallelConfig(), 4, [0] * 4)


def test_grid_groups_follow_the_design_table():
    """Design §2: rank = (dp*C + c)*L + l; each group is the ranks sharing the coordinates the
    table names; a federation shares one token shard, the D*L shards are all distinct."""
    D, C, L = 2, 3, 2
    grid = check_layout(ModelConfig(num_query_groups=6, num_attention_heads=6, hidden_size=60,
                                    num_experts=12, moe_router_topk=3, vocab_size=258),
                        ParallelConfig(data=D, clusters=C, ranks_per_cluster=L), 12,
                        consecutive_nodes(12, 3))
    assert grid.node_of_rank == (0,) * 4 + (1,) * 4 + (2,) * 4
    assert grid.rank(1, 2, 1) == 11 and grid.coords(11) == (1, 2, 1)
    same = {"cluster_ep": ("dp", "c"), "federation": ("dp", "l"), "token_dp": ("c",),
            "expert_dp": ("c", "l"), "replica": ("dp",)}
    for rank in range(D * C * L):
        mine = grid.coords(rank)
        assert grid.rank(*mine) == rank
        for name, fixed in same.items():
            expect = [r for r in range(D * C * L)
                      if all(getattr(grid.coords(r), k) == getattr(mine, k) for k in fixed)]
            assert grid.group(name, rank) == expect, (name, rank)
        shards = {grid.token_shard(r) for r in grid.group("federation", rank)}
        assert shards == {mine.dp * L + mine.l}
    assert sorted({grid.token_shard(r) for r in range(D * C * L)}) == list(range(D * L))
    assert grid.token_shards == D * L
    assert grid.groups("cluster_ep") == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11]]
    assert set(grid.rank_groups()) == {"single", *same}  # members uneven over nodes: flat


def test_grid_of_the_baseline_is_one_cluster_of_ep_ranks():
    model = ModelConfig(kind="moe", num_experts=8, moe_router_topk=2)
    grid = check_layout(model, ParallelConfig(expert_parallel=4), 8, [0] * 8)
    assert grid.rank_groups() == {
        "single": [[r] for r in range(8)], "ep": [[0, 1, 2, 3], [4, 5, 6, 7]],
        "dp": [list(range(8))], "expert_dp": [[0, 4], [1, 5], [2, 6], [3, 7]]}
    assert [grid.token_shard(r) for r in range(8)] == list(range(8)) and grid.token_shards == 8
    assert grid.federation_levels() == ([], [])


def test_federation_levels_two_members_per_node():
    parallel = ParallelConfig(clusters=4)
    two_level = Grid.of("foe", parallel, 4, consecutive_nodes(4, 2))
    assert two_level.federation_levels() == ([[0, 1], [2, 3]], [[0, 2], [1, 3]])
    assert two_level.rank_groups()["federation_local"] == [[0, 1], [2, 3]]
    for nodes in (1, 4):  # all members on one node, or one member per node: flat
        assert Grid.of("foe", parallel, 4, consecutive_nodes(4, nodes)).federation_levels() \
            == ([], [])
    uneven = Grid.of("foe", ParallelConfig(clusters=3), 3, [0, 0, 1])
    assert uneven.federation_levels() == ([], [])


def test_recipe_errors_name_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hiden_size: 64\n")
    with pytest.raises(ConfigError, match=r"^model\.hiden_size: unknown key"):
        load_config(bad)
    bad.write_text("model:\n  num_layers: many\n")
    with pytest.raises(ConfigError, match=r"^model\.num_layers: "):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"^model\.num_experts: "):
        load_config(None, ["model.num_experts=[1]"])


def test_recipe_inherits_base_and_takes_overrides():
    cfg = load_config("configs/quickstart/foe.yaml", ["model.num_layers=2"])
    other = load_config("configs/quickstart/moe.yaml")
    assert cfg.model.kind == "foe" and other.model.kind == "moe" and cfg.model.num_layers == 2
    assert cfg.model.hidden_size == other.model.hidden_size


def test_cli_refuses_in_one_line():
    out = subprocess.run(
        [sys.executable, "-m", "foe_train.cli", "comm", "--config", "configs/quickstart/foe.yaml",
         "--nproc", "4", "--nodes", "4", *SPANNING],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0, out.stderr
    assert "parallel.ranks_per_cluster=2" in out.stderr and "span nodes" in out.stderr
