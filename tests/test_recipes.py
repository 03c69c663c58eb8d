"""Recipe rules that keep runs from losing each other's results: shipped pairs write to their
own run directories, checkpoint.keep never deletes the checkpoint just written, a base: cycle
is refused in one line, the collective timeout is a positive number of seconds."""

from pathlib import Path

import pytest

from foe_train.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
PAIRS = sorted(p.parent.name for p in (REPO / "configs").glob("*/foe.yaml"))


def test_every_shipped_pair_is_found():
    assert PAIRS == ["bench", "paper", "quickstart"]


@pytest.mark.parametrize("pair", PAIRS)
def test_pair_members_write_to_their_own_run_directories(pair):
    foe, moe = (load_config(REPO / "configs" / pair / f"{k}.yaml") for k in ("foe", "moe"))
    assert foe.logging.resolved_run_dir() != moe.logging.resolved_run_dir()
    # otherwise the pair differs only in model.kind (and the names that keep them apart), and in
    # the micro-batch: FoE's C clusters share a token shard, so C x the baseline's sequences
    # per rank keep the same number of forward passes per step
    clusters = foe.parallel.clusters
    assert foe.training.micro_batch_size == clusters * moe.training.micro_batch_size
    a, b = foe.model_dump(), moe.model_dump()
    for cfg in (a, b):
        cfg["model"].pop("kind")
        cfg["logging"].pop("name")
        cfg["training"].pop("micro_batch_size")
    assert a == b


@pytest.mark.parametrize("value", [0, -1])
def test_checkpoint_keep_must_keep_the_newest(value):
    with pytest.raises(ConfigError, match=rf"^checkpoint\.keep={value} must be at least 1"):
        load_config(None, [f"checkpoint.keep={value}"])
    assert load_config(None, ["checkpoint.keep=1"]).checkpoint.keep == 1


def test_negative_checkpoint_interval_is_refused():
    with pytest.raises(ConfigError, match=r"^checkpoint\.interval=-5 must be >= 0"):
        load_config(None, ["checkpoint.interval=-5"])


def test_collective_timeout_is_positive_seconds():
    assert load_config(None).training.collective_timeout_s == 600
    assert load_config(None, ["training.collective_timeout_s=30"]).training.collective_timeout_s \
        == 30
    with pytest.raises(ConfigError, match=r"^training\.collective_timeout_s=0"):
        load_config(None, ["training.collective_timeout_s=0"])


def test_base_cycle_is_refused_in_one_line(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\nseed: 1\n")
    (tmp_path / "b.yaml").write_text("base: sub/../a.yaml\n")
    (tmp_path / "sub").mkdir()
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "a.yaml")
    assert str(info.value) == "base: cycle a.yaml -> b.yaml -> a.yaml; remove one of these " \
                              "base: lines"
    (tmp_path / "self.yaml").write_text("base: self.yaml\n")
    with pytest.raises(ConfigError, match=r"^base: cycle self\.yaml -> self\.yaml;"):
        load_config(tmp_path / "self.yaml")
    # a chain of distinct bases is no cycle
    (tmp_path / "root.yaml").write_text("seed: 7\n")
    (tmp_path / "mid.yaml").write_text("base: root.yaml\n")
    (tmp_path / "top.yaml").write_text("base: mid.yaml\nmodel:\n  num_layers: 3\n")
    assert load_config(tmp_path / "top.yaml").seed == 7


@pytest.mark.parametrize("override", [
    "model.num_layers=0", "model.seq_length=0", "model.num_attention_heads=0",
    "model.vocab_size=-8", "model.cluster_topk=0", "parallel.clusters=0",
    "parallel.expert_parallel=0", "training.micro_batch_size=0", "training.eval_iters=0",
    "training.warmup_iters=-1", "logging.log_interval=0",
])
def test_sizes_and_counts_below_their_minimum_are_refused(override):
    # each used to fail inside the workers (a division by zero, an empty tensor) or later
    field, value = override.split("=")
    least = 0 if field == "training.warmup_iters" else 1
    with pytest.raises(ConfigError, match=rf"^{field}: Input should be greater than or equal to "
                                          rf"{least} \(got {value}\)$"):
        load_config(None, [override])
