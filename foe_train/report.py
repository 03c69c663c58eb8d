"""The comparison report of foe-compare and foe-study: every number a user needs to judge
FoE against its MoE baseline, read from the run directories (config.yaml, summary.json,
metrics.jsonl, comm_step.json, eval.json) and written as report.md, report.json and PNG plots.

Runs are grouped into members by ``logging.name`` and matched across members by ``seed``;
the FoE-MoE gap is given both as the gap of the seed means and as the mean and spread of the
per-seed (paired) gaps, so the noise of the comparison is visible next to it.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from foe_train.budget import COMPARED, budget, compare
from foe_train.config import ConfigError, build_config
from foe_train.evaluate.tasks import GENERATORS

_LAST_SHARE = 0.2  # expert load: mean over this last share of the logged steps


def _rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_run(run_dir: Path) -> dict[str, Any]:
    """One run's numbers, straight from its files; a run without summary.json is refused."""
    import yaml

    run_dir = Path(run_dir)
    for name in ("summary.json", "config.yaml"):
        if not (run_dir / name).is_file():
            raise ConfigError(f"{run_dir}: no {name}; pass the run directory of a finished "
                              f"foe-train run")
    cfg = build_config(yaml.safe_load((run_dir / "config.yaml").read_text()))
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = _rows(run_dir / "metrics.jsonl")
    train = [r for r in rows if r.get("split") != "valid"]
    valid = [r for r in rows if r.get("split") == "valid"]
    comm_file = run_dir / "comm_step.json"
    eval_file = run_dir / "eval.json"
    tokens_per_step = cfg.training.global_batch_size * cfg.model.seq_length
    run: dict[str, Any] = {
        "dir": str(run_dir), "member": cfg.logging.name, "seed": cfg.seed,
        "kind": cfg.model.kind, "residual_sync": cfg.model.residual_sync,
        "steps": summary.get("steps"), "tokens": summary.get("tokens"),
        "final_train_loss": summary.get("final_train_loss"),
        "final_val_loss": summary.get("final_val_loss"),
        "wall_time_s": summary.get("wall_time_s"),
        "tokens_per_s": statistics.median([r["tokens_per_s"] for r in train
                                           if "tokens_per_s" in r] or [float("nan")]),
        "expert_load": _expert_load(train),
        "budget": budget(cfg),
        "curves": {"train": [(r["tokens"], r["loss"]) for r in train if "loss" in r],
                   "valid": [(r["step"] * tokens_per_step, r["val_loss"]) for r in valid],
                   "expert_load": {key: [(r["step"], r[key]) for r in train if key in r]
                                   for key in _load_keys(train)}},
    }
    if comm_file.is_file():
        kinds = json.loads(comm_file.read_text())["by_kind"]
        run["comm_bytes_per_token"] = sum(k["bytes"] for k in kinds.values()) / tokens_per_step
        run["cross_node_bytes_per_token"] = sum(k["cross_node_bytes"]
                                                for k in kinds.values()) / tokens_per_step
    if eval_file.is_file():
        run["eval"] = {task: headline(task, result) for task, result in
                       json.loads(eval_file.read_text())["results"].items()}
    return run


def _load_keys(train: list[dict[str, Any]]) -> list[str]:
    return sorted({k for r in train for k in r if k.startswith("expert_load_imbalance/")})


def _expert_load(train: list[dict[str, Any]]) -> dict[str, float]:
    """Per cluster: max/mean tokens per expert (1.0 = even), mean over the last steps."""
    out = {}
    for key in _load_keys(train):
        values = [r[key] for r in train if key in r]
        tail = values[-max(1, round(len(values) * _LAST_SHARE)):]
        out[key.split("/", 1)[1]] = sum(tail) / len(tail)
    return out


def headline(task: str, result: dict[str, Any]) -> float:
    """The one number a task is compared by: val loss, exact match, or LongBench's score."""
    if task == "val":
        return result["loss"]
    if task in GENERATORS:
        return result["exact_match"]
    return result["score"]


def _spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values)
            if len(values) > 1 else 0.0, "min": min(values), "max": max(values),
            "n": len(values)}


def summarize(runs: list[dict[str, Any]], baseline: str | None = None) -> dict[str, Any]:
    """Members (seed means and spreads), gaps to the baseline member, budgets and evals."""
    members: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        members.setdefault(run["member"], []).append(run)
    if baseline is None:
        moe = [name for name, rs in members.items() if rs[0]["kind"] == "moe"]
        baseline = moe[0] if len(moe) == 1 else None
    elif baseline not in members:
        raise ConfigError(f"--baseline: no run is named {baseline!r} (members: "
                          f"{', '.join(members)})")
    base_val = {r["seed"]: r["final_val_loss"] for r in members.get(baseline, [])}
    out: dict[str, Any] = {}
    for name, rs in members.items():
        vals = [r["final_val_loss"] for r in rs if r["final_val_loss"] is not None]
        entry: dict[str, Any] = {
            "kind": rs[0]["kind"], "residual_sync": rs[0]["residual_sync"],
            "seeds": [r["seed"] for r in rs],
            "final_val_loss": _spread(vals) if vals else None,
            "final_train_loss": _spread([r["final_train_loss"] for r in rs]),
            "tokens_per_s": statistics.fmean(r["tokens_per_s"] for r in rs),
            "budget_differs_from_baseline": compare(rs[0]["budget"], members[baseline][0]
                                                    ["budget"]) if baseline else None,
            "eval": {task: _spread([r["eval"][task] for r in rs if task in r.get("eval", {})])
                     for task in sorted({t for r in rs for t in r.get("eval", {})})},
        }
        if baseline and name != baseline and vals and base_val:
            base_mean = statistics.fmean(base_val.values())
            paired = [100 * (r["final_val_loss"] / base_val[r["seed"]] - 1) for r in rs
                      if r["seed"] in base_val and r["final_val_loss"] is not None]
            entry["gap_pct"] = 100 * (entry["final_val_loss"]["mean"] / base_mean - 1)
            entry["paired_gap_pct"] = _spread(paired) if paired else None
        out[name] = entry
    return {"baseline": baseline, "members": out}


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    """report.md: budget, per-run results, member spreads and gaps, evaluations, latency."""
    runs, summary = report["runs"], report["summary"]
    members = summary["members"]
    first = {name: next(r for r in runs if r["member"] == name) for name in members}
    parts = ["# FoE vs MoE comparison", "",
             f"{len(runs)} runs, members {', '.join(members)}, baseline "
             f"{summary['baseline'] or '-'}.", "", "## Budget", ""]
    budget_rows = []
    for field in COMPARED:
        values = [first[m]["budget"][field] for m in members]
        if all(isinstance(v, dict) for v in values):
            budget_rows += [[f"{field}.{k}", *(v[k] for v in values)] for k in values[0]]
        else:
            budget_rows.append([field, *values])
    budget_rows.append(["cluster_norm_params (excepted)",
                        *(first[m]["budget"]["cluster_norm_params"] for m in members)])
    parts += [_table(["field", *members], budget_rows), ""]
    differs = {m: e["budget_differs_from_baseline"] for m, e in members.items()
               if e["budget_differs_from_baseline"]}
    parts += [f"Budget differs from the baseline: {differs}" if differs else
              "Every compared budget field equals the baseline's (design §1).", ""]
    parts += ["## Runs", "", _table(
        ["run", "member", "seed", "steps", "tokens", "final train loss", "final val loss",
         "tokens/s (median)", "comm bytes/token/rank", "cross-node bytes/token/rank",
         "expert load max/mean per cluster (last 20%)"],
        [["/".join(Path(r["dir"]).parts[-2:]), r["member"], r["seed"], r["steps"], r["tokens"],
          r["final_train_loss"], r["final_val_loss"], round(r["tokens_per_s"]),
          r.get("comm_bytes_per_token"), r.get("cross_node_bytes_per_token"),
          ", ".join(f"{c} {v:.3f}" for c, v in r["expert_load"].items()) or "-"]
         for r in runs]), ""]
    parts += ["## Final validation loss over seeds", "", _table(
        ["member", "kind", "residual_sync", "seeds", "mean", "std", "min", "max",
         "gap of means vs baseline %", "paired gap % (mean)", "paired gap % (std)",
         "tokens/s"],
        [[m, e["kind"], e["residual_sync"] if e["kind"] == "foe" else "-",
          len(e["seeds"]), *(e["final_val_loss"][k] if e["final_val_loss"] else None
                             for k in ("mean", "std", "min", "max")),
          e.get("gap_pct"), *(e["paired_gap_pct"][k] if e.get("paired_gap_pct") else None
                              for k in ("mean", "std")), round(e["tokens_per_s"])]
         for m, e in members.items()]), ""]
    tasks = sorted({t for e in members.values() for t in e["eval"]})
    if tasks:
        parts += ["## Evaluation (mean ± std over seeds)", "",
                  "val: loss; passkey, kv: exact match; longbench:*: LongBench's score.", "",
                  _table(["member", *tasks],
                         [[m, *(f"{e['eval'][t]['mean']:.4f} ± {e['eval'][t]['std']:.4f}"
                                if t in e["eval"] else "-" for t in tasks)]
                          for m, e in members.items()]), ""]
    if report.get("latency"):
        parts += ["## Latency ratios (from foe-bench latency JSON)", "", _table(
            ["file", "batch", "prompt_len", "forward", "ttft", "tbt"],
            [[row["file"], row["batch"], row["prompt_len"], *row["ratio"].values()]
             for row in report["latency"]]), ""]
    parts += ["## Plots", ""] + [f"![{p}]({p})" for p in report["plots"]]
    return "\n".join(parts) + "\n"


def _latency(paths: list[str]) -> list[dict[str, Any]]:
    rows = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
            rows += [{"file": Path(path).name, "batch": r["batch"],
                      "prompt_len": r["prompt_len"], "ratio": r["ratio"]} for r in data["rows"]]
        except (OSError, ValueError, KeyError, TypeError):
            raise ConfigError(f"--bench: {path} is not a foe-bench latency --json/--out "
                              f"report; pass the file foe-bench latency --out wrote") from None
    return rows


def plot(report: dict[str, Any], out: Path) -> list[str]:
    """The PNGs (file names under ``out``): loss vs tokens of every run, final validation
    loss per seed, per-cluster expert load over training, latency ratios if given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    members = list(report["summary"]["members"])
    colors = {m: f"C{i}" for i, m in enumerate(members)}
    files = []

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in runs:
        label = f"{r['member']} seed {r['seed']}"
        ax.plot(*zip(*r["curves"]["train"], strict=True), color=colors[r["member"]], alpha=0.35,
                lw=0.8)
        if r["curves"]["valid"]:
            ax.plot(*zip(*r["curves"]["valid"], strict=True), color=colors[r["member"]],
                    marker="o", ms=3, label=f"{label} (val)")
    ax.set(xlabel="training tokens", ylabel="loss", title="loss vs tokens (thin: train)")
    ax.legend(fontsize=7)
    files.append(_save(fig, out, "loss_vs_tokens.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, m in enumerate(members):
        pts = [(r["seed"], r["final_val_loss"]) for r in runs
               if r["member"] == m and r["final_val_loss"] is not None]
        if pts:
            ax.scatter([i] * len(pts), [v for _, v in pts], color=colors[m])
            for s, v in pts:
                ax.annotate(f"seed {s}", (i, v), fontsize=7, xytext=(5, 0),
                            textcoords="offset points")
    ax.set_xticks(range(len(members)), members)
    ax.set(ylabel="final validation loss", title="final validation loss per seed")
    files.append(_save(fig, out, "val_loss_per_seed.png"))

    fig, axes = plt.subplots(1, len(members), figsize=(4 * len(members), 3.5), squeeze=False,
                             sharey=True)
    for ax, m in zip(axes[0], members, strict=True):
        for r in (r for r in runs if r["member"] == m):
            for i, (key, pts) in enumerate(sorted(r["curves"]["expert_load"].items())):
                ax.plot(*zip(*pts, strict=True), color=f"C{i}", alpha=0.6, lw=0.8,
                        label=f"{key.split('/')[-1]} seed {r['seed']}")
        ax.set(title=m, xlabel="step")
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("expert load max/mean")
    files.append(_save(fig, out, "expert_load.png"))

    if report.get("latency"):
        rows = report["latency"]
        fig, ax = plt.subplots(figsize=(7, 4))
        keys = list(rows[0]["ratio"])
        width = 0.8 / len(keys)
        for j, key in enumerate(keys):
            ax.bar([i + j * width for i in range(len(rows))], [r["ratio"][key] for r in rows],
                   width, label=key)
        ax.set_xticks([i + width * (len(keys) - 1) / 2 for i in range(len(rows))],
                      [f"b{r['batch']} p{r['prompt_len']}" for r in rows])
        ax.axhline(1.0, color="k", lw=0.5)
        ax.set(ylabel="ratio (second member / first)", title="latency ratios")
        ax.legend()
        files.append(_save(fig, out, "latency_ratios.png"))
    return files


def _save(fig: Any, out: Path, name: str) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def write_report(run_dirs: list[Path], out: Path, baseline: str | None = None,
                 bench: list[str] | None = None) -> dict[str, Any]:
    """Read every run, write report.md, report.json and the PNGs to ``out``; returns the
    report (with its markdown under "markdown")."""
    runs = [load_run(Path(d)) for d in run_dirs]
    report: dict[str, Any] = {"runs": runs, "summary": summarize(runs, baseline),
                              "latency": _latency(bench or [])}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report["plots"] = plot(report, out)
    text = markdown(report)
    (out / "report.md").write_text(text)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    return {**report, "markdown": text}


def side_by_side(run_dirs: list[str]) -> str:
    """The runs' summaries side by side (foe-compare's table)."""
    rows = ["kind", "final_val_loss", "final_train_loss", "steps", "tokens", "params",
            "active_params_per_token", "wall_time_s"]
    summaries = []
    for run_dir in run_dirs:
        path = Path(run_dir) / "summary.json"
        if not path.is_file():
            raise ConfigError(f"{run_dir}: no summary.json; has the run finished?")
        summaries.append(json.loads(path.read_text()))

    def cell(value: object) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    width = max(len(r) for r in rows)
    lines = [" " * width + "".join(f"  {Path(d).name:>18}" for d in run_dirs)]
    lines += [f"{row:<{width}}" + "".join(f"  {cell(s.get(row)):>18}" for s in summaries)
              for row in rows]
    return "\n".join(lines)
