"""Emulated nodes on one machine: each node is a network namespace whose only link (``lnk``,
a veth into a shared bridge) is rate-capped with tc HTB, so collectives between nodes cross a
slow "inter-node fabric" while collectives inside a node stay on the namespace's loopback.
One torchrun agent runs per namespace with gloo bound to the link.

Needs root and ``ip netns``. Everything created (namespaces, links, processes) is removed on
exit, on failure and on Ctrl-C/SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

from launch.torchrun import rank_environment

LINK = "lnk"
SUBNET = "10.213.{net}.{host}"


class NetnsError(RuntimeError):
    """Emulation cannot run here (not root, no ip netns): one line saying why and what to do."""


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = ["ip", *(["netns", "exec", ns, "ip"] if ns else []), *args]
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def _tc(ns: str, *args: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "tc", *args], check=True, capture_output=True,
                   text=True)


def check_available() -> None:
    if os.geteuid() != 0:
        raise NetnsError("--nodes with --link-rate emulates nodes with network namespaces and "
                         "needs root; run as root or drop --link-rate")
    if shutil.which("ip") is None or shutil.which("tc") is None:
        raise NetnsError("--link-rate needs iproute2 (ip netns, tc); install it "
                         "(apt-get install iproute2) or drop --link-rate")
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if probe.returncode != 0:
        raise NetnsError(f"ip netns is unavailable here ({probe.stderr.strip()}); "
                         f"drop --link-rate")


@dataclass
class Fabric:
    """The namespaces of one emulated cluster; ``addresses[i]`` is node i's link address."""

    nodes: int
    rate: str
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    created: list[str] = field(default_factory=list)

    @property
    def hub(self) -> str:
        return f"foe-{self.tag}-hub"

    def namespace(self, node: int) -> str:
        return f"foe-{self.tag}-n{node}"

    def address(self, node: int) -> str:
        return SUBNET.format(net=int(self.tag[:2], 16), host=node + 1)

    def build(self) -> None:
        """Hub namespace with a bridge; per node a namespace, a veth into the bridge and an
        HTB cap on the node's egress."""
        self._add_ns(self.hub)
        _ip("link", "add", "br0", "type", "bridge", ns=self.hub)
        _ip("link", "set", "br0", "up", ns=self.hub)
        for node in range(self.nodes):
            ns = self.namespace(node)
            self._add_ns(ns)
            _ip("link", "add", LINK, "netns", ns, "type", "veth", "peer", "name", f"p{node}",
                "netns", self.hub, ns=self.hub)
            _ip("link", "set", f"p{node}", "master", "br0", ns=self.hub)
            _ip("link", "set", f"p{node}", "up", ns=self.hub)
            _ip("addr", "add", f"{self.address(node)}/24", "dev", LINK, ns=ns)
            _ip("link", "set", LINK, "up", ns=ns)
            # gloo's 64-256 KiB messages otherwise stall 10-60 ms on the HTB-capped veth: the
            # sender holds its last ~25 KB (less than one 64 KiB GSO segment) with the link idle
            _ip("link", "set", LINK, "gso_max_size", "16384", ns=ns)
            _ip("link", "set", "lo", "up", ns=ns)
            _tc(ns, "qdisc", "add", "dev", LINK, "root", "handle", "1:", "htb", "default", "10")
            _tc(ns, "class", "add", "dev", LINK, "parent", "1:", "classid", "1:10", "htb",
                "rate", self.rate, "ceil", self.rate, "quantum", "60000")

    def _add_ns(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self.created.append(ns)
        with contextlib.suppress(subprocess.CalledProcessError):
            subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w",
                            "net.ipv6.conf.all.disable_ipv6=1"], check=True, capture_output=True)

    def destroy(self) -> None:
        """Kill whatever still runs inside (waiting until it is gone), then delete the
        namespaces, which removes their links."""
        pids = [int(pid) for ns in self.created for pid in subprocess.run(
            ["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(process_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        for ns in reversed(self.created):
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
        self.created.clear()


def process_alive(pid: int) -> bool:
    """Running (a zombie awaiting its parent counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def leftover_namespaces(tag: str = "") -> list[str]:
    """Namespaces of emulated clusters still present (all, or one fabric's by tag)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if n.startswith(f"foe-{tag}")]


@contextlib.contextmanager
def fabric(nodes: int, rate: str) -> Iterator[Fabric]:
    """A built Fabric, destroyed on exit whatever happens (SIGTERM included)."""
    check_available()
    fab = Fabric(nodes, rate)

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        fab.build()
        yield fab
    finally:
        fab.destroy()
        signal.signal(signal.SIGTERM, previous)


def run_emulated(
    module: str, args: list[str], nproc: int, nodes: int, rate: str,
    timeout: float | None = None, env: dict[str, str] | None = None,
) -> int:
    """Run ``python -m module args`` on ``nodes`` emulated nodes (nproc processes in all),
    one torchrun agent per namespace; returns the first non-zero exit code (or 0)."""
    if nproc % nodes:
        raise ValueError(f"--nproc {nproc} is not divisible by --nodes {nodes}")
    with fabric(nodes, rate) as fab:
        full_env = rank_environment({"GLOO_SOCKET_IFNAME": LINK, **(env or {})})
        procs = []
        for node in range(nodes):
            cmd = ["ip", "netns", "exec", fab.namespace(node), sys.executable, "-m",
                   "torch.distributed.run", f"--nnodes={nodes}", f"--node_rank={node}",
                   f"--nproc_per_node={nproc // nodes}", f"--master_addr={fab.address(0)}",
                   "--master_port=29400", "-m", module, *args]
            procs.append(subprocess.Popen(cmd, env=full_env))
        try:
            codes = [p.wait(timeout=timeout) for p in procs]
        finally:
            # agents first, gently: torchrun passes SIGTERM on to its workers and reaps them
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            for p in procs:
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        return next((c for c in codes if c), 0)
