"""Tracker: metrics.jsonl/summary.json, an offline W&B run read back from its .wandb file,
resume, rank gating, progress output, and no W&B files or processes outside the run."""

import io
import json
import os
import re
import sys
from pathlib import Path

import pytest

from foe_train.config import LoggingConfig, WandbConfig
from foe_train.train.tracking import Tracker
from tests.wandb_reader import read_offline_run, records

LOSSES = [1 / 3, 2.718281828459045, 0.1 + 0.2, 1e-7 / 3, 4.0]
CONFIG = {"model": {"hidden_size": 64}, "training": {"lr": 3e-3}}


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """HOME, cwd and W&B's env inside tmp_path; no API key; any network use would hit a
    closed local port."""
    for name in ("home", "cwd"):
        (tmp_path / name).mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_CACHE_DIR",
                "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(var, raising=False)
    yield tmp_path
    assert not any((tmp_path / "home").iterdir()), "W&B wrote into HOME"
    assert not any((tmp_path / "cwd").iterdir()), "W&B wrote into the working directory"
    assert _wandb_children() == [], "a wandb process outlived finish()"


def _wandb_children() -> list[str]:
    """Live (non-zombie) wandb processes started by this test process."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm = text[text.index("(") + 1:text.rindex(")")]
        state, ppid = text[text.rindex(")") + 2:].split()[:2]
        if comm.startswith("wandb") and int(ppid) == os.getpid() and state != "Z":
            found.append(comm)
    return found


def _run_record(run_dir: Path):
    from wandb.proto import wandb_internal_pb2

    (path,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    parsed = map(wandb_internal_pb2.Record.FromString, records(path))
    return next(r.run for r in parsed if r.HasField("run"))


def _logging(mode: str, **kw) -> LoggingConfig:
    return LoggingConfig(name="t", wandb=WandbConfig(mode=mode, tags=["test"]), **kw)


def _train(step: int, loss: float) -> dict[str, float]:
    return {"loss": loss, "lr": 1e-3, "grad_norm": 0.5, "tokens": 512.0 * step,
            "tokens_per_s": 1000.0}


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_offline_run_files_and_wandb_history(isolated):
    run_dir = isolated / "run"
    tracker = Tracker(run_dir, _logging("offline"), CONFIG, True, total_steps=5)
    for step, loss in enumerate(LOSSES, start=1):
        tracker.log(step, _train(step, loss))
    tracker.log_eval(5, {"val_loss": 1 / 7})
    tracker.finish({"final_loss": LOSSES[-1], "steps": 5})

    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 5]
    assert [r["loss"] for r in rows[:5]] == LOSSES
    assert set(rows[0]) == {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s"}
    assert rows[5] == {"step": 5, "val_loss": 1 / 7, "split": "valid"}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary == {"final_loss": 4.0, "steps": 5}

    history = read_offline_run(run_dir)  # decoded from the .wandb file itself
    assert [h["_step"] for h in history] == [1, 2, 3, 4, 5]
    assert [h["loss"] for h in history] == LOSSES
    assert history[-1]["val_loss"] == 1 / 7 and history[0]["tokens"] == 512
    run = _run_record(run_dir)
    assert (run.display_name, list(run.tags), run.project) == ("t", ["test"], "foe-train")
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["model"] == CONFIG["model"] and config["training"] == CONFIG["training"]
    for var, sub in (("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config"),
                     ("WANDB_DATA_DIR", "data")):
        assert os.environ[var] == str(run_dir / "wandb" / sub)
    assert os.environ["WANDB_DIR"] == str(run_dir)


def test_reader_reassembles_records_split_across_blocks(isolated):
    """A 100 KB value spans four 32 KiB blocks (first/middle/last chunks)."""
    run_dir = isolated / "run"
    tracker = Tracker(run_dir, _logging("offline"), CONFIG, True, total_steps=300)
    big = "".join(chr(65 + i % 26) for i in range(100_000))
    tracker._wandb_run.log({"text": big}, step=1)
    for step in range(2, 301):
        tracker.log(step, {"loss": 1 / step})
    tracker.finish({})

    history = read_offline_run(run_dir)
    assert history[0]["text"] == big
    assert [h["loss"] for h in history[1:]] == [1 / s for s in range(2, 301)]


def test_resume_truncates_rows_and_reuses_wandb_run(isolated):
    run_dir = isolated / "run"
    first = Tracker(run_dir, _logging("offline"), CONFIG, True, total_steps=8)
    for step in range(1, 7):  # a checkpoint at 4, then a crash after step 6
        first.log(step, _train(step, step / 10))
    first.finish({})
    run_id = (run_dir / "wandb_id.txt").read_text()
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 7, "lo')  # a torn last line

    second = Tracker(run_dir, _logging("offline"), CONFIG, True, total_steps=8, start_step=4)
    assert [r["step"] for r in _rows(run_dir)] == [1, 2, 3, 4]
    for step in range(5, 9):
        second.log(step, _train(step, step / 100))
    second.finish({})

    assert (run_dir / "wandb_id.txt").read_text() == run_id
    assert [r["loss"] for r in _rows(run_dir)] == [0.1, 0.2, 0.3, 0.4, 0.05, 0.06, 0.07, 0.08]
    segments = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(segments) == 2 and all(s.name.split("-")[3] == run_id.strip() for s in segments)
    history = read_offline_run(run_dir)
    assert [h["loss"] for h in history] == [0.1, 0.2, 0.3, 0.4, 0.05, 0.06, 0.07, 0.08]


def test_disabled_wandb_still_writes_metrics(isolated):
    run_dir = isolated / "run"
    tracker = Tracker(run_dir, _logging("disabled"), CONFIG, True, total_steps=2)
    tracker.log(1, _train(1, 2.0))
    tracker.finish({"ok": True})
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.jsonl", "summary.json"]


def test_other_ranks_write_nothing(isolated):
    run_dir = isolated / "run"
    tracker = Tracker(run_dir, _logging("offline"), CONFIG, False, total_steps=2)
    tracker.log(1, _train(1, 2.0))
    tracker.log_eval(1, {"val_loss": 2.0})
    tracker.finish({})
    assert not run_dir.exists()


def test_online_failure_is_one_line_naming_the_mode(isolated):
    with pytest.raises(RuntimeError) as err:
        Tracker(isolated / "run", _logging("online"), CONFIG, True, total_steps=2)
    msg = str(err.value)
    assert "\n" not in msg and "logging.wandb.mode=online" in msg
    assert "logging.wandb.mode=offline" in msg


def test_compact_lines_without_tty(isolated, capsys):
    tracker = Tracker(isolated / "run", _logging("disabled", log_interval=2), CONFIG, True,
                      total_steps=5)
    for step in range(1, 6):
        tracker.log(step, _train(step, 3.21))
    tracker.log_eval(5, {"val_loss": 3.1})
    tracker.finish({})
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines] == ["2/5", "4/5", "5/5", "5/5"]
    pattern = r"step 2/5 loss 3\.21 lr 1\.0e-03 tok/s 1000 eta \d+:\d\d:\d\d"
    assert re.fullmatch(pattern, lines[0])
    assert lines[-1] == "step 5/5 val_loss 3.1"


def test_progress_bar_on_tty(isolated, monkeypatch, capsys):
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Tty())
    tracker = Tracker(isolated / "run", _logging("disabled"), CONFIG, True, total_steps=4,
                      start_step=1)
    for step in range(2, 5):
        tracker.log(step, _train(step, 2.5))
    tracker.finish({})
    bar = sys.stderr.getvalue()
    assert "4/4" in bar and "loss=2.5" in bar and "tok/s=1000" in bar
    assert capsys.readouterr().out == ""
