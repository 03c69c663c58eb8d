"""Refusals of bad layouts and recipes: each is one line naming the field and the fix."""

import subprocess
import sys

import pytest

from foe_train.config import ConfigError, ModelConfig, ParallelConfig, load_config
from foe_train.topology import TopologyError, check_layout

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
         "--nproc", "4", "--nodes", "4"], capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0, out.stderr
    assert "parallel.ranks_per_cluster=2" in out.stderr and "span nodes" in out.stderr
