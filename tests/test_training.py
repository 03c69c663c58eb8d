"""foe-train end to end on 4 gloo ranks: learning, exact resume after SIGKILL, fallback past a
damaged checkpoint, resharding, crash-safe saves, signal checkpoints, tracking files, run
directories that are never silently overwritten, lifecycle lines, one-line refusals."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from megatron.core import dist_checkpointing

from foe_train.checkpoint import complete_checkpoints, damage
from foe_train.cli import train_main
from foe_train.config import load_config
from foe_train.data.loader import build_datasets
from foe_train.data.tokenizers import build_tokenizer
from launch.torchrun import torchrun_commands
from tests.corpus_stats import unigram_entropy
from tests.wandb_reader import read_offline_run

TINY = str(Path(__file__).parent / "recipes" / "tiny.yaml")
FOE_TRAIN = shutil.which("foe-train")


def launch(run_dir: Path, *overrides: str, resume: str | None = None) -> subprocess.Popen:
    cmd = [FOE_TRAIN, "--config", TINY, "--nproc", "4", f"logging.run_dir={run_dir}",
           *overrides]
    cmd += ["--resume", resume] if resume else []
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def train_output(run_dir: Path, *overrides: str, resume: str | None = None) -> str:
    proc = launch(run_dir, *overrides, resume=resume)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    return out


def train(run_dir: Path, *overrides: str, resume: str | None = None) -> dict:
    train_output(run_dir, *overrides, resume=resume)
    return json.loads((run_dir / "summary.json").read_text())


def refused(capsys: pytest.CaptureFixture, *args: str) -> str:
    """foe-train (in this process) refusing before it starts torchrun: exit 2, nothing on
    stdout, one line on stderr."""
    with pytest.raises(SystemExit) as info:
        train_main(list(args))
    out, err = capsys.readouterr()
    assert info.value.code == 2 and out == "", out[-2000:] + err[-2000:]
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


def metrics(run_dir: Path, split: str | None = None) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("split") == split]


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def signal_tree(proc: subprocess.Popen, sig: int) -> None:
    """torchrun puts workers in sessions of their own: signal every descendant."""
    tree = psutil.Process(proc.pid)
    for p in [tree, *tree.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(sig)


def kill_tree(proc: subprocess.Popen) -> None:
    signal_tree(proc, signal.SIGKILL)
    proc.communicate()


@pytest.fixture(scope="module")
def entropy() -> float:
    cfg = load_config(TINY)
    tokenizer = build_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_path)
    train_ds, _, _ = build_datasets(cfg.data, cfg.model, cfg.training, tokenizer, cfg.seed)
    return unigram_entropy(train_ds, 2000)


@pytest.mark.parametrize("layout", [
    ("model.kind=foe", "parallel.clusters=2", "parallel.ranks_per_cluster=2"),
    ("model.kind=foe", "parallel.data=2", "parallel.clusters=2", "parallel.ranks_per_cluster=1"),
    ("model.kind=moe",),
], ids=["foe-1x2x2", "foe-2x2x1", "moe-ep4"])
def test_training_learns_below_unigram_entropy(tmp_path, entropy, layout):
    summary = train(tmp_path, *layout, "training.train_iters=100", "training.eval_interval=50",
                    "checkpoint.interval=0", "logging.wandb.mode=offline")
    assert 3.0 < entropy < 3.5
    # the unigram entropy is the best loss without context: well below it means the model uses
    # context (measured: last-10-step train loss ~2.6-2.7, valid 2.75-2.92 against 3.24; the
    # MoE's valid loss moves by 0.015 with float rounding alone)
    rows = metrics(tmp_path)
    assert sum(r["loss"] for r in rows[-10:]) / 10 < 0.87 * entropy, (summary, entropy)
    assert summary["final_val_loss"] < 0.93 * entropy, (summary, entropy)
    assert [r["step"] for r in rows] == list(range(1, 101))
    for key in ("tokens", "loss", "lr", "grad_norm", "tokens_per_s"):
        assert all(key in r for r in rows)
    assert [r["step"] for r in metrics(tmp_path, "valid")] == [50, 100]
    logged = [r for r in read_offline_run(tmp_path) if "loss" in r]
    assert [r["loss"] for r in logged] == [r["loss"] for r in rows]
    assert summary["tokens"] == 100 * 16 * 64 and summary["params"] > 0


def test_resume_after_sigkill_repeats_the_loss_sequence(tmp_path, finished_run):
    reference, said = finished_run
    for line in ("foe-train: saved iter_0000003 (step 3) to ", "foe-train: saved iter_0000008 ",
                 "foe-train: finished at step 8 in ", f"; run directory {reference}\n",
                 f"foe-train: summary {reference / 'summary.json'}, metrics "
                 f"{reference / 'metrics.jsonl'}, checkpoint {reference}/checkpoints/iter_0000008"):
        assert line in said, said[-3000:]
    killed = tmp_path / "killed"
    proc = launch(killed)
    wait_for(lambda: (killed / "metrics.jsonl").is_file() and len(metrics(killed)) >= 5, proc)
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
               if p.environ().get("RANK") == "1"
               and "torch.distributed.run" in " ".join(p.parent().cmdline())]
    assert len(workers) == 1
    workers[0].send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert [p.name for p in complete_checkpoints(killed / "checkpoints")][-1] == "iter_0000003"
    first_segment = dist_checkpointing.load_common_state_dict(
        str(killed / "checkpoints" / "iter_0000003"))["wall_time_s"]
    said = train_output(killed, resume="auto")
    assert f"foe-train: resumed from iter_0000003 (step 3) in {killed / 'checkpoints'}" in said
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["steps"] == 8
    # the whole run's training time: the first segment's up to its checkpoint, then this one's
    assert 0 < first_segment < summary["wall_time_s"]
    assert [r["loss"] for r in metrics(killed)] == [r["loss"] for r in metrics(reference)]
    assert [r["step"] for r in metrics(killed)] == list(range(1, 9))

    # a damaged newest checkpoint: --resume auto names the file, falls back to the previous
    # one and trains on to the uninterrupted run's final loss
    newest = complete_checkpoints(killed / "checkpoints")[-1]
    assert newest.name == "iter_0000008" and damage(newest) is None
    shard = sorted(newest.glob("*.distcp"))[-1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert damage(newest).startswith(f"{shard} is truncated ({shard.stat().st_size} of ")
    said = train_output(killed, resume="auto")
    warnings = [line for line in said.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and str(shard) in warnings[0] and "iter_0000006" in warnings[0]
    assert "foe-train: resumed from iter_0000006 (step 6)" in said
    again = json.loads((killed / "summary.json").read_text())
    assert again["final_train_loss"] == summary["final_train_loss"] == \
        metrics(reference)[-1]["loss"]
    assert again["final_val_loss"] == pytest.approx(summary["final_val_loss"], rel=1e-6)
    assert [r["loss"] for r in metrics(killed)] == [r["loss"] for r in metrics(reference)]

    # the other kinds of damage, each named by its file
    intact = complete_checkpoints(killed / "checkpoints")[-1]
    for name, harm, why in ((shard.name, Path.unlink, "is missing"),
                            (".metadata", lambda p: p.write_bytes(p.read_bytes()[:100]),
                             "is unreadable"),
                            ("common.pt", lambda p: p.write_bytes(b"\0" * 64), "is unreadable")):
        copy = tmp_path / f"copy-{name}"
        shutil.copytree(intact, copy)
        harm(copy / name)
        assert damage(copy).startswith(f"{copy / name} {why}"), damage(copy)


def test_reshard_checkpoint_to_other_data_and_cluster_ranks(tmp_path, finished_run):
    """Saved at (D, L) = (1, 2), continued at (2, 1): the five steps after loading (weights,
    Adam moments, schedule) match, step by step, the uninterrupted run at (1, 2), which a
    resume at the same layout repeats exactly (test_resume_after_sigkill_...)."""
    saved, _ = finished_run
    assert [p.name for p in complete_checkpoints(saved / "checkpoints")] == [
        "iter_0000003", "iter_0000006", "iter_0000008"]
    resharded = train(tmp_path, "parallel.data=2", "parallel.ranks_per_cluster=1",
                      resume=str(saved / "checkpoints" / "iter_0000003"))
    expected = [r for r in metrics(saved) if r["step"] > 3]
    got = metrics(tmp_path)
    assert [r["step"] for r in got] == [r["step"] for r in expected] == [4, 5, 6, 7, 8]
    for a, b in zip(got, expected, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (a, b)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5), (a, b)
    same = json.loads((saved / "summary.json").read_text())
    assert resharded["final_val_loss"] == pytest.approx(same["final_val_loss"], rel=1e-5)


def test_refuses_checkpoint_of_other_cluster_count(tmp_path, capsys, finished_run):
    # a run directory stands for its newest intact checkpoint (as for foe-generate); the
    # mismatch is refused before any worker starts
    err = refused(capsys, "--config", TINY, "--nproc", "4", f"logging.run_dir={tmp_path / 'b'}",
                  "parallel.clusters=4", "parallel.ranks_per_cluster=1", "model.cluster_topk=1",
                  "--resume", str(finished_run[0]))
    assert err.startswith("error: parallel.clusters: checkpoint") and "saved with clusters=2" in err


def test_run_directory_and_resume_refusals_come_before_any_worker(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints" / "iter_0000100").mkdir(parents=True)  # no metadata.json: incomplete
    (run / "summary.json").write_text('{"steps": 100}\n')
    (run / "metrics.jsonl").write_text("")
    base = ["--config", TINY, "--nproc", "4", f"logging.run_dir={run}"]
    err = refused(capsys, *base)
    assert err.startswith(f"error: logging.run_dir: {run} holds another run's results "
                          f"(metrics.jsonl, summary.json, checkpoints); continue it with "
                          f"--resume auto, start over with --overwrite"), err
    assert (run / "summary.json").read_text() == '{"steps": 100}\n'
    assert refused(capsys, *base, "--overwrite", "--resume", "auto").startswith(
        "error: --overwrite starts the run over and --resume continues it")
    fresh = ["--config", TINY, "--nproc", "4", f"logging.run_dir={tmp_path / 'new'}"]
    assert refused(capsys, *fresh, "--resume", "/nonexistent") == (
        "error: --resume: /nonexistent does not exist; pass a checkpoint, a run directory or "
        "'auto'\n")
    assert refused(capsys, *fresh, "--resume", str(run)).startswith(
        f"error: --resume: {run} holds no complete checkpoint yet")
    assert refused(capsys, "--nproc", "4") == (
        "error: --config: required; pass a recipe, e.g. --config configs/quickstart/foe.yaml\n")
    assert not (tmp_path / "new").exists()


def test_kill_during_save_keeps_previous_checkpoint(tmp_path):
    proc = launch(tmp_path, "checkpoint.interval=1", "checkpoint.keep=10",
                  "training.train_iters=50")
    root = tmp_path / "checkpoints"

    def partial_dirs() -> list[Path]:
        return [p for p in root.iterdir() if p.name.endswith(".partial")] if root.is_dir() else []

    # freeze the job the moment a save is in flight; if it finished in between, thaw and
    # wait for the next one (every step saves)
    for _ in range(40):
        wait_for(lambda: bool(partial_dirs()) and bool(complete_checkpoints(root)), proc)
        signal_tree(proc, signal.SIGSTOP)
        if partial_dirs():
            break
        signal_tree(proc, signal.SIGCONT)
    kill_tree(proc)
    partial, done = partial_dirs(), complete_checkpoints(root)
    assert partial and done
    step = int(done[-1].name.split("_")[1])
    assert partial[0].name == f"iter_{step + 1:07d}.partial"
    summary = train(tmp_path, f"training.train_iters={step + 3}", resume="auto")
    assert summary["steps"] == step + 3
    assert [r["step"] for r in metrics(tmp_path)] == list(range(1, step + 4))
    assert [p.name for p in complete_checkpoints(root)][-1] == f"iter_{step + 3:07d}"


def test_sigterm_saves_a_checkpoint_then_exits(tmp_path):
    # an earlier run's results are in the run directory: --overwrite moves them aside whole
    run = tmp_path / "run"
    (run / "checkpoints" / "iter_0000100").mkdir(parents=True)
    (run / "summary.json").write_text('{"steps": 100}\n')
    proc = launch(run, "training.train_iters=200", "checkpoint.interval=0", "--overwrite")
    wait_for(lambda: (run / "metrics.jsonl").is_file() and len(metrics(run)) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped_by_signal"] and summary["steps"] < 200
    ckpt = f"iter_{summary['steps']:07d}"
    assert complete_checkpoints(run / "checkpoints")[-1].name == ckpt
    assert f"foe-train: stopped by SIGTERM after checkpoint {ckpt} (step {summary['steps']}); " \
           f"continue with --resume auto" in out, out[-3000:]
    (aside,) = tmp_path.glob("run.old-*")
    assert f"foe-train: --overwrite: moved the previous run in {run} to {aside}" in out
    assert (aside / "summary.json").read_text() == '{"steps": 100}\n'
    assert (aside / "checkpoints" / "iter_0000100").is_dir()


@pytest.mark.parametrize("overrides, field", [
    (["model.hiden_size=3"], "model.hiden_size"),
    (["model.num_layers=two"], "model.num_layers"),
    (["model.seq_length=0"], "model.seq_length"),  # was a ZeroDivisionError in every worker
    (["data.prefixes=[/nonexistent/corpus]"], "data.prefixes"),
    (["model.num_query_groups=2", "parallel.clusters=4", "parallel.ranks_per_cluster=1"],
     "parallel.clusters=4 does not divide model.num_query_groups=2"),
])
def test_bad_recipe_fails_fast_in_one_line(tmp_path, overrides, field):
    start = time.monotonic()
    out = subprocess.run([FOE_TRAIN, "--config", TINY, "--nproc", "4", *overrides],
                         capture_output=True, text=True, timeout=60)
    assert time.monotonic() - start < 5
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and out.stderr.startswith(f"error: {field}")


@pytest.mark.parametrize("kind", ["foe", "moe"])
def test_two_torchrun_nodes_keep_foe_all_to_all_inside_nodes(tmp_path, kind):
    """Two torchrun agents (c10d rendezvous on loopback) train with one FoE cluster per node;
    the recorded first step shows where all-to-all traffic goes."""
    proc = subprocess.run(
        [FOE_TRAIN, "--config", TINY, "--nproc", "4", "--nodes", "2", f"model.kind={kind}",
         f"logging.run_dir={tmp_path}", "training.train_iters=3", "checkpoint.interval=0"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "comm_step.json").read_text())
    assert report["nodes"] == 2
    a2a = {k: v for k, v in report["by_kind"].items() if k.startswith("all_to_all@")}
    assert a2a
    if kind == "foe":
        assert set(a2a) == {"all_to_all@cluster_ep"}
        assert a2a["all_to_all@cluster_ep"]["cross_node_bytes"] == 0
        assert all(not spans for op, _, spans in report["collectives"]
                   if op.startswith("all_to_all"))
    else:
        assert a2a["all_to_all@ep"]["cross_node_bytes"] > 0


def test_joining_sets_timeouts_and_flushes_subnormals(tmp_path):
    """training.collective_timeout_s reaches every process group, also those created later
    without a timeout argument (torch would give them its 30-minute default); and the CPU
    flushes subnormal floats to zero in every thread (sharp attention makes them, and they
    slowed a CPU training step by up to 80%)."""
    out = tmp_path / "join.json"
    (cmd,) = torchrun_commands("tests.join_worker", ["--out", str(out)], nproc=2)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    # failed after the 1 s timeout, long before the peer's 8 s absence ended
    assert report["outcome"] != "completed" and "imed out" in report["outcome"], report
    assert 0.9 < report["waited_s"] < 6, report
    assert report["subnormal_product"] == 0.0, report  # 4 x 2^-141 without flushing
