"""Emulated nodes: namespaces joined by rate-capped links; everything is removed afterwards,
also when the run is interrupted."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from launch.netns import leftover_namespaces, process_alive, run_emulated

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2"
)


def test_two_nodes_over_a_capped_link(tmp_path):
    before = set(leftover_namespaces())
    out = tmp_path / "r.json"
    code = run_emulated("tests.netns_worker", [str(out), "0"], nproc=4, nodes=2, rate="200mbit",
                        timeout=180)
    assert code == 0
    r = json.loads(out.read_text())
    assert r["nodes"] == [0, 0, 1, 1] and r["value"] == 4.0**5
    # 5 all-reduces of 1 MiB across a 200 Mbit/s link take well over 0.1 s (ring: 1.5 MiB
    # each way per all-reduce per rank across the link)
    assert r["seconds"] > 0.1
    assert set(leftover_namespaces()) == before


def test_interrupted_run_leaves_nothing_behind(tmp_path):
    before = set(leftover_namespaces())
    out = tmp_path / "r.json"
    code = ("from launch.netns import run_emulated\n"
            f"run_emulated('tests.netns_worker', ['{out}', '600'], 4, 2, '1gbit')\n")
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "r.json").exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.2)
    ours = set(leftover_namespaces()) - before
    assert len(ours) == 3  # hub + 2 nodes
    pids = {int(p) for ns in ours for p in subprocess.run(
        ["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()}
    assert pids
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert set(leftover_namespaces()) == before
    assert not [p for p in pids if process_alive(p)]
