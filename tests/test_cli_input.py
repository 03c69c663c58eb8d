"""Count options of every foe-* command (processes, batches, lengths, steps, seeds...) refuse 0,
negative and non-numeric values, and --link-rate refuses what tc cannot read, in one line before
any process starts, instead of failing deep inside a run (``foe-bench latency --batch 0`` used to
end in a traceback from megatron, ``--link-rate fast`` in one from building the namespaces)."""

from collections.abc import Callable

import pytest

from foe_train.arguments import link_rate
from foe_train.bench.projection import project_main
from foe_train.cli import bench_main, train_main
from foe_train.data.prepare import main as prepare_main
from foe_train.evaluate.run import main as eval_main
from foe_train.infer.generate import main as generate_main
from foe_train.study import main as study_main
from launch import netns, torchrun

QUICK = ["configs/quickstart/foe.yaml", "configs/quickstart/moe.yaml"]
LATENCY = ["latency", "--pair", *QUICK, "--nproc", "4"]
PROJECT = ["--pair", "configs/paper/foe.yaml", "configs/paper/moe.yaml", "--cluster",
           "configs/hardware/h100-8x.yaml"]


@pytest.mark.parametrize(("main", "argv", "says"), [
    (bench_main, [*LATENCY, "--batch", "4", "0"], "argument --batch: 0 is below 1"),
    (bench_main, [*LATENCY, "--prompt-len", "-8"], "argument --prompt-len: -8 is below 1"),
    (bench_main, [*LATENCY, "--gen-len", "1"], "argument --gen-len: 1 is below 2"),
    (bench_main, [*LATENCY, "--reps", "two"], "argument --reps: 'two' is not a whole number"),
    # each member splits the batch over its token shards: the FoE's D*L = 2
    (bench_main, [*LATENCY, "--batch", "3"], "--batch 3: not divisible by the 2 token shards"),
    (bench_main, ["comm", "--config", QUICK[0], "--nproc", "4", "--micro-batch", "0"],
     "argument --micro-batch: 0 is below 1"),
    (bench_main, ["train", "--pair", *QUICK, "--nproc", "4", "--warmup", "-1"],
     "argument --warmup: -1 is below 0"),
    (bench_main, ["project", *PROJECT, "--nodes", "1", "0"], "argument --nodes: 0 is below 1"),
    (bench_main, ["project", *PROJECT, "--requests", "0"], "argument --requests: 0 is below 1"),
    (project_main, [*PROJECT, "--batch", "0"], "argument --batch: 0 is below 1"),
    (train_main, ["--config", QUICK[0], "--nproc", "0"], "argument --nproc: 0 is below 1"),
    (generate_main, ["--config", QUICK[0], "--prompt", "x", "--max-new-tokens", "0"],
     "argument --max-new-tokens: 0 is below 1"),
    (eval_main, ["--checkpoint", "runs/x", "--samples", "0"], "argument --samples: 0 is below 1"),
    (study_main, ["configs/study/cpu", "--seeds", "0"], "argument --seeds: 0 is below 1"),
    (prepare_main, ["--input", "a.txt", "--output-prefix", "b", "--num-proc", "0"],
     "argument --num-proc: 0 is below 1"),
    (bench_main, [*LATENCY, "--nodes", "2", "--link-rate", "fast"],
     "argument --link-rate: 'fast' is not a link rate"),
    (bench_main, ["train", "--pair", *QUICK, "--nproc", "4", "--link-rate", "0gbit"],
     "argument --link-rate: '0gbit' is not a link rate"),
    (project_main, ["--calibrate", "--link-rate", "1gb"],
     "argument --link-rate: '1gb' is not a link rate"),
])
def test_bad_options_are_refused_in_one_line(main, argv, says, monkeypatch, capsys):
    err = refused(main, monkeypatch, capsys, *argv)
    assert err.startswith("error: ") and says in err, err


def refused(main: Callable[[list[str]], None], monkeypatch: pytest.MonkeyPatch,
            capsys: pytest.CaptureFixture, *argv: str) -> str:
    """A foe-* command refusing ARGV before any process starts: exit 2, nothing on stdout,
    one line on stderr (returned)."""
    def no_launch(*args, **kwargs):
        raise AssertionError("a refused command must start no process")

    monkeypatch.setattr(torchrun, "run_local", no_launch)
    monkeypatch.setattr(netns, "run_emulated", no_launch)
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    out, err = capsys.readouterr()
    assert exc.value.code == 2 and not out and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("rate", ["1gbit", "100mbit", "12.5mbps", "10Gbit", "2gibit", "800kbit"])
def test_tc_rates_pass(rate):
    assert link_rate(rate) == rate
