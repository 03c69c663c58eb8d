"""SLURM batch scripts for foe-train jobs, and their submission.

The script runs one task per node (``python -m launch.agent``, one torchrun agent each) joined
by a c10d rendezvous on the first node at a port chosen when the job starts. Preemption: SLURM
sends SIGUSR1 to the batch shell ``preempt_signal_seconds`` before the time limit; the shell
forwards it to the srun step, every node's agent stops its training workers (they checkpoint
at the end of the step and exit 0), and the shell requeues the job, whose next run resumes
with ``--resume auto``. The script text depends only on its inputs (no dates, no random ids),
so it can be compared with a golden file.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

from foe_train.config import RecipeConfig
from launch.cluster import ClusterConfig

# foe_train.train.loop checkpoints the last step as checkpoints/iter_<step:07d>
# (foe_train.train.checkpoint.save); once that exists the run is complete
_FINAL_CHECKPOINT = "checkpoints/iter_{step:07d}"

_GPU_ENV = {
    "NCCL_DEBUG": "WARN",
    # a collective that cannot finish (a node died) aborts the job instead of hanging it
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
}


@dataclass
class BatchJob:
    """Everything the script says: the recipe as given (path and overrides, the path as the
    job will see it from ``workdir``) and as resolved, the cluster and the checked placement."""

    config_path: str
    overrides: list[str]
    recipe: RecipeConfig
    cluster: ClusterConfig
    workdir: Path
    placement: list[str]

    @property
    def name(self) -> str:
        return self.recipe.logging.name

    @property
    def run_dir(self) -> Path:
        """The recipe's run directory as the job resolves it (relative to workdir)."""
        log = self.recipe.logging
        path = Path(log.run_dir.format(name=log.name)).expanduser()
        return Path(os.path.normpath(self.workdir / path))


def _environment(job: BatchJob) -> dict[str, str]:
    env = {"PYTHONUNBUFFERED": "1"}
    if job.cluster.accelerator == "gpu":
        env.update(_GPU_ENV)
    # W&B writes only inside the run directory (as foe_train.train.tracking sets it up)
    env.update(
        WANDB_MODE=job.recipe.logging.wandb.mode,
        WANDB_DIR="$RUN_DIR",
        WANDB_CACHE_DIR="$RUN_DIR/wandb/cache",
        WANDB_CONFIG_DIR="$RUN_DIR/wandb/config",
        WANDB_DATA_DIR="$RUN_DIR/wandb/data",
    )
    env.update(job.cluster.env)
    return env


def _export(key: str, value: str) -> str:
    if value.startswith("$RUN_DIR"):  # expanded by the shell
        return f'export {key}="{value}"'
    return f"export {key}={shlex.quote(value)}"


def _sbatch_options(job: BatchJob) -> list[str]:
    c = job.cluster
    opts = [f"--job-name=foe-{job.name}", f"--nodes={c.nodes}", "--ntasks-per-node=1"]
    if c.accelerator == "gpu":
        opts.append(f"--gpus-per-node={c.gpus_per_node}")
    if c.exclusive:
        opts.append("--exclusive")
    if c.partition:
        opts.append(f"--partition={c.partition}")
    if c.account:
        opts.append(f"--account={c.account}")
    opts += [f"--time={c.time}", f"--signal=B:USR1@{c.preempt_signal_seconds}", "--requeue",
             "--open-mode=append", f"--chdir={job.workdir}",
             f"--output={job.run_dir}/slurm-%j.out"]
    return [f"#SBATCH {opt}" for opt in opts]


def _srun(job: BatchJob) -> list[str]:
    """The srun command, one item per continued line."""
    c = job.cluster
    # the one task per node gets every CPU the job has there (SLURM's default is one)
    lines = ['srun --kill-on-bad-exit=1 --ntasks-per-node=1 --cpus-per-task="$SLURM_CPUS_ON_NODE"']
    if c.container_image:
        mounts = [f"{job.workdir}:{job.workdir}"]
        if not job.run_dir.is_relative_to(job.workdir):
            mounts.append(f"{job.run_dir}:{job.run_dir}")
        lines += [f"--container-image={shlex.quote(c.container_image)}",
                  f"--container-mounts={shlex.quote(','.join(mounts + c.container_mounts))}",
                  f"--container-workdir={shlex.quote(str(job.workdir))}"]
    train = ["--", "--config", job.config_path, "--resume", "auto", *job.overrides]
    return lines + [
        f'python -m launch.agent --nnodes "$SLURM_NNODES" --nproc-per-node {c.gpus_per_node}',
        '--rdzv-endpoint "${HOSTS[0]}:$PORT" --rdzv-id "$RDZV_ID"',
        " ".join(shlex.quote(a) for a in train) + " &",
    ]


def render(job: BatchJob) -> str:
    """The sbatch script."""
    c = job.cluster
    unit = "GPUs" if c.accelerator == "gpu" else "processes"
    final = _FINAL_CHECKPOINT.format(step=job.recipe.training.train_iters)
    lines = [
        "#!/bin/bash",
        f"# foe-train job written by foe-launch: {job.config_path} on {c.nodes} "
        f"node{'s' if c.nodes > 1 else ''} x {c.gpus_per_node} {unit}.",
        "# Placement (ranks are consecutive per node):",
        *[f"#   {line}" for line in job.placement],
        f"# Preemption: SLURM sends SIGUSR1 {c.preempt_signal_seconds} s before the time "
        "limit; this script forwards",
        "# it to the srun step, each node's launch.agent stops its training workers (they "
        "checkpoint",
        "# and exit), then the job requeues itself and resumes from the checkpoint.",
        *_sbatch_options(job),
        "set -euo pipefail",
        "",
        f"RUN_DIR={shlex.quote(str(job.run_dir))}",
        "# the last step's checkpoint: once it exists the run is complete, never requeue it",
        f'FINAL_CHECKPOINT="$RUN_DIR/{final}"',
    ]
    lines += ["", "# environment of every node (srun passes it on)"]
    if c.venv:
        lines += [f"export VIRTUAL_ENV={shlex.quote(c.venv)}",
                  'export PATH="$VIRTUAL_ENV/bin:$PATH"']
    lines += [_export(key, value) for key, value in _environment(job).items()]
    lines += [
        "",
        "# rendezvous on the first node (where this script runs) at a port free there now;",
        "# a new id for every run of the job (SLURM_RESTART_COUNT counts requeues)",
        'mapfile -t HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")',
        "PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind((\"\", 0)); "
        "print(s.getsockname()[1])')",
        'RDZV_ID="$SLURM_JOB_ID-${SLURM_RESTART_COUNT:-0}"',
        'echo "foe-launch: job $SLURM_JOB_ID run ${SLURM_RESTART_COUNT:-0} on ${HOSTS[*]},'
        ' rendezvous ${HOSTS[0]}:$PORT"',
        "",
        'srun_pid=""',
        "preempted=0",
        "interrupted=0",
        "on_usr1() {",
        "    preempted=1",
        "    interrupted=1",
        '    echo "foe-launch: SIGUSR1 before the time limit: checkpointing"',
        '    if [ -n "$srun_pid" ]; then kill -USR1 "$srun_pid" || true; fi',
        "}",
        "trap on_usr1 USR1",
        "",
        " \\\n    ".join(_srun(job)),
        "srun_pid=$!",
        "# a trapped signal ends `wait` early: wait again for srun's own exit status",
        "while :; do",
        "    interrupted=0",
        "    status=0",
        '    wait "$srun_pid" || status=$?',
        '    if [ "$interrupted" = 0 ]; then break; fi',
        "done",
        'if [ "$preempted" = 1 ] && [ ! -e "$FINAL_CHECKPOINT" ]; then',
        '    echo "foe-launch: srun exited $status after SIGUSR1; requeueing to resume"',
        '    scontrol requeue "$SLURM_JOB_ID"',
        "fi",
        'exit "$status"',
    ]
    return "\n".join(lines) + "\n"


def submit(script: Path) -> str:
    """sbatch the script; returns the job id."""
    out = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True,
                         check=True)
    return out.stdout.strip().split(";")[0]
