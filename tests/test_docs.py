"""The repository explains itself: the README's links resolve inside the checkout, the design
is in docs/design.md, the README's foe-launch example runs as written, foe-launch --help is
whole, and the test command shows per-file progress, skip reasons and the slowest tests."""

import re
import shlex
from pathlib import Path

import pytest

from launch.cli import main as launch_main

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def test_readme_links_resolve_inside_the_repository():
    links = re.findall(r"\]\(([^)#\s]+)[^)]*\)", README)
    assert "docs/design.md" in links
    for link in links:
        if "://" in link:
            continue
        target = (REPO / link).resolve()
        assert target.is_relative_to(REPO) and target.exists(), link
    assert "../shared" not in README and "DESIGN" not in README


def test_design_covers_the_layer_topology_communication_and_budget_rule():
    design = (REPO / "docs" / "design.md").read_text()
    headings = re.findall(r"^## (\d)\. (.+)$", design, flags=re.M)
    assert [n for n, _ in headings] == ["1", "2", "3", "4"]
    for must in ("h'   = h + sum over c of (m_c + a_c)", "rank = (dp · C + c) · L + l",
                 "2·k·d·b·(P−1)/P", "2·(C−1)/C·d·b", "2·(C−1)·d", "### Identical budgets"):
        assert must in design, must
    assert "shared/" not in design


def test_readme_slurm_example_runs_as_written(tmp_path, monkeypatch, capsys):
    (line,) = [s.strip() for s in README.splitlines() if s.strip().startswith("foe-launch slurm")
               and "--config configs/" in s]
    argv = shlex.split(line)[1:]
    monkeypatch.chdir(REPO)
    launch_main([*argv, "--output-dir", str(tmp_path)])  # not into the checkout's runs/
    out, err = capsys.readouterr()
    assert out.startswith("#!/bin/bash") and "--resume auto" in out
    assert "node1: ranks 8-15" in err and (tmp_path / "paper-foe.sbatch").is_file()


def test_foe_launch_help_is_whole(capsys):
    with pytest.raises(SystemExit) as info:
        launch_main(["--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "or a SLURM batch script (written, printed or submitted), for a recipe on a " \
           "cluster." in out
    assert "foe-launch slurm --config configs/paper/foe.yaml --cluster" in out


def test_test_command_reports_skips_and_durations():
    (addopts,) = re.findall(r'^addopts = "(.*)"$', (REPO / "pyproject.toml").read_text(),
                            flags=re.M)
    assert "-rs" in addopts.split() and "--durations=15" in addopts.split()
    command = "python -m pytest tests"
    assert command in README and command in (REPO / ".ci" / "run").read_text()
    assert "pytest -q" not in README + (REPO / ".ci" / "run").read_text()
