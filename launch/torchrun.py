"""Start torchrun agents on this machine. With nodes > 1, one agent per emulated node joins a
c10d rendezvous on loopback, so each process gets a real node identity (GROUP_RANK) from
torchrun, exactly as on a cluster."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_commands(module: str, args: list[str], nproc: int, nodes: int = 1) -> list[list[str]]:
    """The torchrun command line of each node's agent."""
    if nproc % nodes:
        raise ValueError(f"--nproc {nproc} is not divisible by --nodes {nodes}; give each node "
                         f"the same number of processes")
    port, run_id = free_port(), uuid.uuid4().hex[:8]
    base = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc // nodes}"]
    if nodes == 1:
        base += ["--standalone"]
    else:
        base += [f"--nnodes={nodes}", "--rdzv_backend=c10d", f"--rdzv_id={run_id}",
                 f"--rdzv_endpoint=127.0.0.1:{port}"]
    return [base + ["-m", module, *args] for _ in range(nodes)]


def run_local(
    module: str, args: list[str], nproc: int, nodes: int = 1, timeout: float | None = None,
    env: dict[str, str] | None = None,
) -> int:
    """Run the agents to completion; returns the first non-zero exit code (or 0). SIGTERM
    and SIGUSR1 are forwarded to the agents (torchrun passes SIGTERM on to its workers, which
    checkpoint and exit); on failure or Ctrl-C every agent is terminated."""
    full_env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                **(env or {})}
    commands = torchrun_commands(module, args, nproc, nodes)
    procs = [subprocess.Popen(cmd, env=full_env) for cmd in commands]

    def forward(signum: int, frame: object) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM if signum == signal.SIGUSR1 else signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait()
    return next((c for c in codes if c), 0)
