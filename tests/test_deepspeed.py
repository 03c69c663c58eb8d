"""training.engine=deepspeed on 4 gloo ranks: ZeRO-1 and ZeRO-2 train the quickstart FoE
recipe at (D,C,L) = (1,2,2) and (2,2,1) and the MoE recipe to the megatron engine's per-step
losses and clipped gradient norms; a DeepSpeed run killed on one rank resumes to the
uninterrupted run's losses; no C++ is compiled at run time (every launch runs with the
compilers made unavailable); a bad DeepSpeed JSON is refused in one line before any process
starts. Two launches in all: a foe-train run that is killed, then one worker for every
comparison, the uninterrupted reference run and the killed run's resumption."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from foe_train.checkpoint import complete_checkpoints
from foe_train.config import ConfigError, load_config
from foe_train.train.deepspeed_engine import deepspeed_config
from tests.test_comm import SPANNING
from tests.test_training import refused

ROOT = Path(__file__).parent.parent
TINY = str(ROOT / "tests" / "recipes" / "tiny.yaml")
QUICK = ROOT / "configs" / "quickstart"
STEPS = 12
# the quickstart recipes as they are (4 layers, 200-step schedule), at a quarter of the
# sequence length, with smaller micro-batches where that makes DeepSpeed accumulate gradients
CASES = [
    ["foe-1x2x2", str(QUICK / "foe.yaml"),
     ["model.seq_length=32", "training.micro_batch_size=4", *SPANNING]],
    ["foe-2x2x1", str(QUICK / "foe.yaml"), ["model.seq_length=32"]],
    ["moe-ep4", str(QUICK / "moe.yaml"),
     ["model.seq_length=32", "training.micro_batch_size=2", *SPANNING]],
]
RESUME_RECIPE = [TINY, "training.engine=deepspeed", "training.deepspeed.zero_stage=2"]


def relative(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


def metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "split" not in r]


@pytest.fixture(scope="module")
def no_compiler(tmp_path_factory) -> dict[str, str]:
    """An environment in which any C++ build fails: the compilers on PATH are /bin/false, and
    torch's extension cache is empty (so nothing built earlier is found)."""
    root = tmp_path_factory.mktemp("nocc")
    bin_dir = root / "bin"
    bin_dir.mkdir()
    for name in ("g++", "c++", "gcc", "cc", "x86_64-linux-gnu-g++", "ninja"):
        (bin_dir / name).symlink_to("/bin/false")
    (root / "extensions").mkdir()
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CXX": "/bin/false",
            "CC": "/bin/false", "TORCH_EXTENSIONS_DIR": str(root / "extensions")}


@pytest.fixture(scope="module")
def killed(tmp_path_factory, no_compiler) -> Path:
    """A ZeRO-2 foe-train run whose rank 1 was SIGKILLed after step 5 (last checkpoint:
    step 3)."""
    run_dir = tmp_path_factory.mktemp("killed") / "run"
    cmd = ["foe-train", "--config", RESUME_RECIPE[0], "--nproc", "4", *RESUME_RECIPE[1:],
           f"logging.run_dir={run_dir}"]
    proc = subprocess.Popen(cmd, env=no_compiler, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        while not ((run_dir / "metrics.jsonl").is_file() and len(metrics(run_dir)) >= 5):
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            time.sleep(0.05)
        rank1 = [p for p in psutil.Process(proc.pid).children(recursive=True)
                 if p.environ().get("RANK") == "1"
                 and "torch.distributed.run" in " ".join(p.parent().cmdline())]
        assert len(rank1) == 1
        rank1[0].send_signal(signal.SIGKILL)
        proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert [p.name for p in complete_checkpoints(run_dir / "checkpoints")][-1] == "iter_0000003"
    return run_dir


@pytest.fixture(scope="module")
def compared(tmp_path_factory, no_compiler, killed) -> tuple[dict, Path, str]:
    """Records of every case and engine, the reference run's directory, and the launch's
    output; the killed run is continued (--resume auto) in the same launch."""
    out = tmp_path_factory.mktemp("compare")
    reference = out / "reference"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=4",
           str(ROOT / "tests" / "deepspeed_worker.py"), "--cases", json.dumps(CASES),
           "--steps", str(STEPS), "--out", str(out / "records.json"),
           "--reference", *RESUME_RECIPE, f"logging.run_dir={reference}",
           "--resume", *RESUME_RECIPE, f"logging.run_dir={killed}"]
    proc = subprocess.run(cmd, env=no_compiler, cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    return json.loads((out / "records.json").read_text()), reference, log


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_zero_trains_to_the_megatron_engines_losses_and_grad_norms(compared, case):
    records = compared[0][case]
    megatron = records["megatron"]
    assert len(megatron["loss"]) == STEPS
    # the comparison means something: training moves the loss, and clipping (to
    # training.clip_grad=1) acts on some steps
    assert megatron["loss"][-1] < megatron["loss"][0] - 0.5, megatron
    assert max(megatron["grad_norm"]) > 1.0, megatron
    for stage in ("zero1", "zero2"):
        assert relative(records[stage]["loss"], megatron["loss"]) <= 1e-4, (stage, records)
        assert relative(records[stage]["grad_norm"], megatron["grad_norm"]) <= 1e-4, \
            (stage, records)


def test_no_cxx_is_compiled_at_run_time(compared, no_compiler):
    # both launches succeeded with every compiler failing; and nothing was built or cached
    assert not os.listdir(no_compiler["TORCH_EXTENSIONS_DIR"])
    assert "Building extension" not in compared[2] and "ninja" not in compared[2]


def test_resume_after_sigkill_repeats_the_loss_sequence(compared, killed, capsys):
    reference = compared[1]
    assert "foe-train: resumed from iter_0000003 (step 3)" in compared[2]
    assert [r["step"] for r in metrics(killed)] == list(range(1, 9))
    assert [r["loss"] for r in metrics(killed)] == [r["loss"] for r in metrics(reference)]
    assert [r["grad_norm"] for r in metrics(killed)] == \
        [r["grad_norm"] for r in metrics(reference)]
    # the megatron engine cannot continue a DeepSpeed checkpoint: refused before any worker
    err = refused(capsys, "--config", TINY, "--nproc", "4", f"logging.run_dir={killed}",
                  "--resume", "auto")
    assert "training.engine: checkpoint " in err and "training.engine=deepspeed" in err


@pytest.mark.parametrize("json_text, says", [
    ('{"zero_optimization": {"stage": 1}, "train_batch_sise": 16}',
     "unknown or unsupported key 'train_batch_sise'"),
    ('{"zero_optimization": {"stage": 1, "reduce_bucket": 5}}',
     "zero_optimization.reduce_bucket: unknown key"),
    ('{"zero_optimization": {"stage": 3}}', "zero_optimization.stage=3 is not supported"),
    ('{"zero_optimization": {"stage": 0}}', "zero_optimization.stage=0 is not supported"),
    ('{"train_batch_size": 32}', "train_batch_size=32 but training.global_batch_size is 16"),
    ('{"train_micro_batch_size_per_gpu": 2}',
     "train_micro_batch_size_per_gpu=2 but training.micro_batch_size is 8"),
    ('{"gradient_accumulation_steps": 2}', "gradient_accumulation_steps=2 but training."),
    ('{"gradient_clipping": 0.5}', "gradient_clipping=0.5 but training.clip_grad is 1.0"),
    ('{"optimizer": {"type": "AdamW"}}', "'optimizer' comes from the recipe"),
    ('{"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}',
     "zero_optimization.offload_optimizer is not supported"),
    ('{"zero_optimization": {"stage": 2, "reduce_scatter": false}}',
     "reduce_scatter and contiguous_gradients must stay true"),
    ('{"bf16": {"enabled": true}}', "bf16.enabled=True but the recipe trains in fp32"),
    ('{"fp16": {"enabled": true}}', "fp16.enabled is not supported"),
    ('{"zero_optimization": 2}', "'zero_optimization' must be a JSON object"),
    ('[1, 2]', "must hold a JSON object"),
    ('{"zero_optimization": ', "is not valid JSON"),
], ids=["unknown-key", "unknown-zero-key", "stage3", "stage0", "global-batch", "micro-batch",
        "accumulation", "clipping", "optimizer", "offload", "reduce-scatter", "bf16", "fp16",
        "zero-not-object", "not-object", "not-json"])
def test_bad_deepspeed_json_is_refused_in_one_line(tmp_path, json_text, says):
    path = tmp_path / "ds.json"
    path.write_text(json_text)
    cfg = load_config(QUICK / "foe.yaml", ["training.engine=deepspeed",
                                           f"training.deepspeed.config={path}"])
    with pytest.raises(ConfigError) as info:
        deepspeed_config(cfg, 2, False)
    assert says in str(info.value) and str(path) in str(info.value), info.value
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("overrides, says", [
    (["training.deepspeed.zero_stage=2"], "training.deepspeed: applies only to"),
    (["training.engine=zero"], "training.engine: "),
    (["training.engine=deepspeed", "training.deepspeed.zero_stage=3"],
     "zero_optimization.stage=3 is not supported"),
    (["training.engine=deepspeed",
      f"training.deepspeed.config={ROOT / 'configs' / 'deepspeed' / 'zero2.json'}",
      "training.global_batch_size=32"], "train_batch_size=16 but training.global_batch_size"),
], ids=["section-without-engine", "unknown-engine", "stage3", "json-vs-recipe"])
def test_foe_train_refuses_bad_engine_settings_before_starting(tmp_path, capsys, overrides,
                                                               says):
    err = refused(capsys, "--config", str(QUICK / "foe.yaml"), "--nproc", "4",
                  f"logging.run_dir={tmp_path / 'run'}", *overrides)
    assert says in err, err
    assert not (tmp_path / "run").exists()


def test_example_configs_pass_preflight_and_reach_slurm(tmp_path, capsys, monkeypatch):
    from foe_train.train.preflight import preflight
    from launch.cli import main as launch_main

    monkeypatch.chdir(ROOT)  # foe-zero2.yaml names its JSON relative to the repository root
    for recipe in ("foe-zero1.yaml", "moe-zero1.yaml", "foe-zero2.yaml"):
        cfg = load_config(ROOT / "configs" / "deepspeed" / recipe)
        assert cfg.training.engine == "deepspeed"
        preflight(cfg, 4)
    cfg = load_config(ROOT / "configs" / "deepspeed" / "foe-zero2.yaml")
    ds = deepspeed_config(cfg, 2, False)
    assert ds["zero_optimization"]["stage"] == 2 and ds["train_batch_size"] == 16
    assert ds["gradient_accumulation_steps"] == 1 and ds["gradient_clipping"] == 1.0
    launch_main(["slurm", "--config", "configs/deepspeed/foe-zero1.yaml", "--venv",
                 str(tmp_path), "--nodes", "1", "--gpus-per-node", "4", "--dry-run",
                 "--output-dir", str(tmp_path)])
    script = capsys.readouterr().out
    assert "--config configs/deepspeed/foe-zero1.yaml --resume auto" in script, script
