"""Fixtures shared by several test modules: a trained run costs a 4-rank launch, so the tests
that only read one share it."""

import shutil
import subprocess
from pathlib import Path

import pytest

TINY = str(Path(__file__).parent / "recipes" / "tiny.yaml")


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A finished 8-step foe-train run of the tiny FoE recipe on 1 x 2 x 2 ranks, every
    checkpoint kept (steps 3, 6 and 8), and what foe-train printed: the uninterrupted
    reference of the resume tests and the trained weights that resharding, refusals and
    generation start from. Tests only read it."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    proc = subprocess.run(
        [shutil.which("foe-train"), "--config", TINY, "--nproc", "4", "checkpoint.keep=3",
         f"logging.run_dir={run_dir}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return run_dir, proc.stdout
