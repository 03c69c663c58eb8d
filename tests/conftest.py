"""Fixtures shared by several test modules: a trained run costs a 4-rank launch, so the tests
that only read one share it."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A finished 8-step foe-train run of the tiny FoE recipe on 1 x 2 x 2 ranks, every
    checkpoint kept (steps 3, 6 and 8), and what foe-train printed: the uninterrupted
    reference of the resume tests and the trained weights that resharding, refusals and
    generation start from. Tests only read it."""
    from tests.test_training import train_output

    run_dir = tmp_path_factory.mktemp("finished") / "run"
    return run_dir, train_output(run_dir, "checkpoint.keep=3")
