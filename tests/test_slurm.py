"""foe-launch's batch script on a real SLURM cluster on this machine (munged, slurmctld and
slurmd as plain processes, all state in a temporary directory): a 4-rank CPU job of the tiny
FoE recipe trains to the end, and a job sent SIGUSR1 checkpoints, requeues itself and resumes
to exactly the uninterrupted run's losses."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from launch.torchrun import free_port

REPO = Path(__file__).resolve().parents[1]
# long enough that a stop lands mid-run, short enough for CI (~0.3 s a step on 2 cores)
RECIPE = ["--config", "tests/recipes/tiny.yaml", "training.train_iters=30",
          "training.eval_interval=15", "checkpoint.interval=0"]
PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
SBIN = "/usr/sbin:/sbin"


def _install_packages() -> str | None:
    """Install SLURM and munge from Debian if missing; the reason they are unusable, or None."""
    path = f"{os.environ['PATH']}:{SBIN}"
    if all(shutil.which(cmd, path=path) for cmd in ("slurmctld", "slurmd", "sbatch", "munged")):
        return None
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        return "SLURM is not installed and apt-get (as root) is not available to install it"
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                             env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        if out.returncode:
            return f"{' '.join(cmd[:2])} failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}"
    return None


class LocalSlurm:
    """A one-node SLURM cluster, facts from shared/notes/slurm-local.md."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf"),
                    "PATH": f"{os.environ['PATH']}:{SBIN}"}
        self.daemons: list[subprocess.Popen] = []

    def run(self, *cmd: str, check: bool = True) -> str:
        out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        assert not check or out.returncode == 0, f"{cmd}: {out.stderr}"
        return out.stdout

    def write_config(self) -> None:
        root = self.root
        for sub in ("munge", "state", "spool"):
            (root / sub).mkdir()
        root.chmod(0o755)
        (root / "munge").chmod(0o755)  # munged refuses a socket dir others cannot read
        key = root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        hw = dict(item.split("=", 1) for item in
                  self.run("slurmd", "-C").splitlines()[0].split())
        # binding to loopback only needs this machine's name to resolve (else srun hangs)
        try:
            socket.gethostbyname(socket.gethostname())
            comm = "CommunicationParameters=NoInAddrAny\n"
        except OSError:
            comm = ""
        (root / "slurm.conf").write_text(
            f"ClusterName=foetest\nSlurmctldHost=localhost\n"
            f"SlurmctldPort={free_port()}\nSlurmdPort={free_port()}\n"
            # cred_expire also delays a requeued job's restart (default 120 s)
            f"AuthInfo=socket={root}/munge/munge.sock,cred_expire=5\n{comm}"
            f"StateSaveLocation={root}/state\nSlurmdSpoolDir={root}/spool\n"
            f"SlurmctldPidFile={root}/slurmctld.pid\nSlurmdPidFile={root}/slurmd.pid\n"
            f"SlurmctldLogFile={root}/slurmctld.log\nSlurmdLogFile={root}/slurmd.log\n"
            "ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\n"
            "SelectType=select/cons_tres\nJobAcctGatherType=jobacct_gather/none\n"
            "AccountingStorageType=accounting_storage/none\nMpiDefault=none\n"
            "MailProg=/bin/true\nReturnToService=2\n"
            # schedule pending (and requeued) jobs every second, not every minute
            "SchedulerParameters=batch_sched_delay=0,sched_interval=1\n"
            f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={hw['CPUs']} "
            f"RealMemory={hw['RealMemory']}\n"
            "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP\n"
        )

    def start(self) -> None:
        root = self.root
        self.write_config()
        munge = root / "munge"
        self._daemon("munged", "-F", f"--socket={munge}/munge.sock",
                     f"--key-file={munge}/munge.key", f"--pid-file={munge}/munged.pid",
                     f"--log-file={munge}/munged.log", f"--seed-file={munge}/munged.seed")
        deadline = time.monotonic() + 10
        while not (munge / "munge.sock").exists():
            assert self.daemons[0].poll() is None, self.logs()
            assert time.monotonic() < deadline, "munged did not start"
            time.sleep(0.05)
        self._daemon("slurmctld", "-D")
        self._daemon("slurmd", "-D", "-N", "localhost")
        deadline = time.monotonic() + 30
        while self.run("sinfo", "-h", "-N", "-n", "localhost", "-o", "%T",
                       check=False).strip() != "idle":
            for d in self.daemons:
                assert d.poll() is None, f"{d.args[0]} exited: {self.logs()}"
            assert time.monotonic() < deadline, f"node not idle: {self.logs()}"
            time.sleep(0.1)

    def _daemon(self, *cmd: str) -> None:
        log = (self.root / f"{cmd[0]}.out").open("w")
        self.daemons.append(subprocess.Popen(cmd, env=self.env, stdout=log,
                                             stderr=subprocess.STDOUT))

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}"
                         for p in sorted(self.root.glob("*.out")))

    def job(self, job_id: str) -> dict[str, str]:
        line = self.run("scontrol", "show", "job", "-o", job_id).strip()
        return dict(item.split("=", 1) for item in line.split() if "=" in item)

    def wait_job(self, job_id: str, timeout: float = 300) -> dict[str, str]:
        """Poll until the job has ended (a requeued job goes back to PENDING, not ended)."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                                    "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"):
                return info
            assert time.monotonic() < deadline, f"job {job_id} still {info['JobState']}"
            time.sleep(0.2)

    def steps_running(self) -> list[Path]:
        """slurmstepd keeps a socket in the spool directory while its step lives."""
        return [p for p in (self.root / "spool").iterdir() if p.is_socket()]

    def stop(self) -> None:
        """Cancel every job, wait for squeue to empty and every slurmstepd to go, then
        TERM the daemons (slurmd last to start, first to stop) by PID."""
        try:
            if self.daemons and all(d.poll() is None for d in self.daemons):
                jobs = self.run("squeue", "-h", "-o", "%i", check=False).split()
                if jobs:
                    self.run("scancel", *jobs, check=False)
                deadline = time.monotonic() + 60
                while (self.run("squeue", "-h", check=False).strip() or self.steps_running()) \
                        and time.monotonic() < deadline:
                    time.sleep(0.2)
        finally:
            for d in reversed(self.daemons):
                if d.poll() is None:
                    d.terminate()
                    try:
                        d.wait(timeout=15)
                    except subprocess.TimeoutExpired:
                        d.kill()
                        d.wait()


@pytest.fixture(scope="module")
def slurm():
    reason = _install_packages()
    if reason:
        pytest.skip(reason)
    # munged wants every directory above its socket searchable by all: not pytest's tmp
    root = Path(tempfile.mkdtemp(prefix="foe-slurm-", dir="/tmp"))
    cluster = LocalSlurm(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def submit(slurm: LocalSlurm, run_dir: Path) -> str:
    """foe-launch slurm on the local cluster, with this interpreter's virtualenv."""
    proc = subprocess.run(
        [sys.executable, "-m", "launch.cli", "slurm", "--cluster", "configs/clusters/local.yaml",
         "--venv", sys.prefix, *RECIPE, f"logging.run_dir={run_dir}"],
        cwd=REPO, env=slurm.env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith("node0: ranks 0-3: replica 0 clusters 0-1 (2 ranks each)\n")
    return proc.stdout.strip()


def metrics(run_dir: Path, split: str | None = None) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("split") == split]


def checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir()
                  if (p / "metadata.json").is_file())


@pytest.fixture(scope="module")
def reference(slurm, tmp_path_factory) -> Path:
    """The recipe trained start to end as one SLURM job."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    job_id = submit(slurm, run_dir)
    info = slurm.wait_job(job_id)
    log = (run_dir / f"slurm-{job_id}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", log[-4000:]
    return run_dir


def test_job_trains_to_the_end(reference):
    summary = json.loads((reference / "summary.json").read_text())
    assert summary["steps"] == 30 and not summary["stopped_by_signal"]
    assert [r["step"] for r in metrics(reference)] == list(range(1, 31))
    assert summary["final_train_loss"] == metrics(reference)[-1]["loss"]
    assert [r["step"] for r in metrics(reference, "valid")] == [15, 30]
    assert checkpoints(reference) == ["iter_0000030"]
    log = next(reference.glob("slurm-*.out")).read_text()
    assert "foe-launch: job" in log and "rendezvous localhost:" in log
    assert "SIGUSR1" not in log and (reference / "run.sbatch").is_file()


def test_preempted_job_checkpoints_requeues_and_resumes_exactly(slurm, reference, tmp_path):
    run_dir = tmp_path / "run"
    job_id = submit(slurm, run_dir)
    deadline = time.monotonic() + 240
    while not ((run_dir / "metrics.jsonl").is_file() and len(metrics(run_dir)) >= 2):
        assert slurm.job(job_id)["JobState"] in ("PENDING", "RUNNING"), slurm.job(job_id)
        assert time.monotonic() < deadline, "no training steps logged"
        time.sleep(0.05)
    # what --signal=B:USR1@N does before the time limit: signal the batch shell only
    slurm.run("scancel", "--signal=USR1", "--batch", job_id)
    info = slurm.wait_job(job_id)
    log = (run_dir / f"slurm-{job_id}.out").read_text()  # --open-mode=append: both runs
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-4000:]
    assert "requeueing to resume" in log and f"foe-launch: job {job_id} run 1 on" in log

    # the stop's checkpoint (checkpoint.interval=0 writes no other) and the final one
    stop_ckpt, final = checkpoints(run_dir)
    stopped_at = int(stop_ckpt.removeprefix("iter_"))
    assert final == "iter_0000030" and 2 <= stopped_at < 30
    # the second run resumed there rather than starting over
    second = log[log.index(f"job {job_id} run 1 on"):]
    assert log.count("step 1/30 ") == 1 and "step 1/30 " not in second
    assert f"step {stopped_at + 1}/30 " in second and f"step {stopped_at}/30 " not in second

    ref, got = metrics(reference), metrics(run_dir)
    assert [r["step"] for r in got] == list(range(1, 31))
    for key in ("loss", "grad_norm", "lr", "tokens"):
        assert [r[key] for r in got] == [r[key] for r in ref], key
    assert [r for r in metrics(run_dir, "valid") if r["step"] in (15, 30)] == \
        metrics(reference, "valid")
    summary = json.loads((run_dir / "summary.json").read_text())
    expected = json.loads((reference / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["final_train_loss"] == expected["final_train_loss"]
    assert summary["final_val_loss"] == expected["final_val_loss"]
