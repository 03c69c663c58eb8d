"""Run tracking on rank 0: metrics.jsonl and summary.json in the run directory, an optional
W&B run (offline by default; every W&B file stays inside the run directory) and a progress
line. Other ranks get a no-op tracker so the training loop needs no rank checks."""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from tqdm import tqdm

from foe_train.config import LoggingConfig

# WANDB_DIR makes W&B write <run_dir>/wandb/; the others would default to ~/.cache, ~/.config
# and ~/.local/share.
_WANDB_DIRS = {
    "WANDB_DIR": ".",
    "WANDB_CACHE_DIR": "wandb/cache",
    "WANDB_CONFIG_DIR": "wandb/config",
    "WANDB_DATA_DIR": "wandb/data",
}

# Shown in the compact progress line, in this order, when the caller logged them; the bar
# shows the _BAR_KEYS subset (it has its own rate and ETA).
_LINE_FIELDS = (("loss", "loss", "{:.4g}"), ("lr", "lr", "{:.1e}"),
                ("tokens_per_s", "tok/s", "{:.0f}"))
_BAR_KEYS = ("loss", "tokens_per_s")


class Tracker:
    """Records a run's metrics on rank 0; ``enabled=False`` (other ranks) makes every call a
    no-op that writes nothing."""

    def __init__(
        self, run_dir: Path, logging: LoggingConfig, config: dict, enabled: bool,
        total_steps: int, start_step: int = 0,
    ) -> None:
        self.enabled = enabled
        if not enabled:
            return
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._log_interval = logging.log_interval
        self._total = total_steps
        self._start_step = start_step
        self._wandb_run = _init_wandb(self.run_dir, logging, config, resume=start_step > 0)
        metrics = self.run_dir / "metrics.jsonl"
        if start_step > 0:
            _drop_rows_after(metrics, start_step)
        self._metrics = metrics.open("a" if start_step > 0 else "w")
        use_bar = logging.progress and sys.stderr.isatty()
        self._bar = tqdm(total=total_steps, initial=start_step, file=sys.stderr, unit="step",
                         dynamic_ncols=True) if use_bar else None
        self._t0 = time.monotonic()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Training metrics at ``step`` (loss, lr, grad_norm, tokens, tokens_per_s, ...)."""
        if not self.enabled:
            return
        self._write({"step": step, **metrics})
        if self._wandb_run is not None:
            self._wandb_run.log(metrics, step=step)
        if self._bar is not None:
            postfix = {label: fmt.format(metrics[key]) for key, label, fmt in _LINE_FIELDS
                       if key in metrics and key in _BAR_KEYS}
            self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(step - self._bar.n)
        elif step % self._log_interval == 0 or step == self._total:
            fields = [f"{label} {fmt.format(metrics[key])}" for key, label, fmt in _LINE_FIELDS
                      if key in metrics]
            print(" ".join([f"step {step}/{self._total}", *fields, f"eta {self._eta(step)}"]),
                  flush=True)

    def log_eval(self, step: int, metrics: dict[str, float]) -> None:
        """Validation metrics at ``step``, e.g. ``{"val_loss": x}``."""
        if not self.enabled:
            return
        self._write({"step": step, **metrics, "split": "valid"})
        if self._wandb_run is not None:
            self._wandb_run.log(metrics, step=step)
        fields = " ".join(f"{key} {value:.4g}" for key, value in metrics.items())
        tqdm.write(f"step {step}/{self._total} {fields}")  # above the bar, if there is one

    def finish(self, summary: dict) -> None:
        """Write summary.json, close the W&B run and stop its service process, close the bar."""
        if not self.enabled:
            return
        _atomic_write(self.run_dir / "summary.json",
                      json.dumps(summary, indent=2, default=float) + "\n")
        self._metrics.close()
        if self._bar is not None:
            self._bar.close()
        if self._wandb_run is not None:
            import wandb

            self._wandb_run.summary.update(summary)
            self._wandb_run.finish()
            wandb.teardown()  # else wandb-core lives on until the interpreter exits

    def _write(self, row: dict[str, Any]) -> None:
        # One flushed line per call: a crash loses at most the line being written.
        self._metrics.write(json.dumps(row, default=float) + "\n")
        self._metrics.flush()

    def _eta(self, step: int) -> str:
        done = step - self._start_step
        if done <= 0:
            return "?"
        left = (time.monotonic() - self._t0) / done * (self._total - step)
        return str(timedelta(seconds=round(left)))


def _init_wandb(run_dir: Path, logging: LoggingConfig, config: dict, resume: bool) -> Any:
    """Start the W&B run, or None when disabled. A resumed run reuses the id in wandb_id.txt,
    so it continues the same W&B run."""
    cfg = logging.wandb
    if cfg.mode == "disabled":
        return None
    for var, sub in _WANDB_DIRS.items():
        os.environ[var] = str((run_dir / sub).resolve())
    import wandb  # only rank 0 with W&B on pays for the import

    id_file = run_dir / "wandb_id.txt"
    if resume and id_file.exists():
        run_id = id_file.read_text().strip()
    else:
        run_id = secrets.token_hex(4)  # W&B ids are short [a-z0-9]
        _atomic_write(id_file, run_id + "\n")
    try:
        return wandb.init(
            mode=cfg.mode, project=cfg.project, entity=cfg.entity, name=cfg.name or logging.name,
            tags=cfg.tags, group=cfg.group, config=config, id=run_id, resume="allow",
            settings=wandb.Settings(quiet=True),
        )
    except Exception as exc:  # any failure to start W&B is reported the same way
        wandb.teardown()
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RuntimeError(
            f"logging.wandb.mode={cfg.mode}: wandb.init failed ({reason}); set "
            f"logging.wandb.mode=offline to log locally and `wandb sync` later"
        ) from None


def _drop_rows_after(path: Path, last_step: int) -> None:
    """Keep only rows up to the resumed checkpoint's step: rows a crashed run wrote after it
    (and a torn last line) would otherwise be duplicated."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step", 0) <= last_step:
            keep.append(line + "\n")
    _atomic_write(path, "".join(keep))


def _atomic_write(path: Path, text: str) -> None:
    """Readers (and a crash) see the old file or the new one, never half of it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
