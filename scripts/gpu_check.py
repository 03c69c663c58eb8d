"""The GPU check behind scripts/gpu_check.sh: each stage is a real launch of the product on
the card (torchrun, NCCL for one rank per GPU), its outcome and figures collected into one
JSON file. A failing stage is recorded with its error and the next one still runs.

Topologies: NCCL allows one rank per GPU, so on one card the oracle runs the baseline (EP 1)
and FoE at (1,1,1) on NCCL, then FoE (1,2,1) with two ranks sharing the card over gloo
(CUDA tensors, host transport: correctness only). Timing and generation compare FoE (1,1,1)
with the MoE at EP 1: the same model and compute, so the ratio shows what the FoE code path
costs beside megatron's stock layer; the communication win needs several GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TOLERANCE = {"fp32": {"logits": 1e-4, "grads": 1e-3}, "bf16": {"logits": 2e-2, "grads": 1e-1}}
GPU_PAIR = ["model.num_layers=8", "model.hidden_size=2048", "model.num_attention_heads=16",
            "model.num_query_groups=8", "model.ffn_hidden_size=8192", "model.num_experts=16",
            "model.moe_ffn_hidden_size=1408", "model.moe_router_topk=4",
            "model.vocab_size=32768", "model.seq_length=2048", "training.micro_batch_size=4",
            "training.global_batch_size=4", "parallel.clusters=1",
            "parallel.ranks_per_cluster=1", "parallel.expert_parallel=1"]
ONE_RANK = ["parallel.clusters=1", "parallel.ranks_per_cluster=1", "parallel.expert_parallel=1"]


def launch(out: Path, name: str, nproc: int, module: str, args: list[str],
           timeout: float, env: dict[str, str] | None = None) -> tuple[int, str]:
    """torchrun of ``module`` on this machine; its output goes to OUT/<name>.log."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", module, *args]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
        code, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        code, text = 124, f"{exc.stdout or ''}{exc.stderr or ''}\ntimed out after {timeout} s"
    (out / f"{name}.log").write_text(text)
    print(f"[{time.perf_counter() - start:6.1f} s] {name}: exit {code}", flush=True)
    return code, text


def environment() -> dict[str, Any]:
    """The card, the software, the layer implementation chosen and the CPU patches' state."""
    import torch

    from foe_train import compat
    from foe_train.model.builder import layer_backend, uses_grouped_gemm

    compat.apply_cpu_compat()
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "nccl": ".".join(map(str, torch.cuda.nccl.version())),
            "layer_backend": layer_backend(),
            "grouped_gemm": uses_grouped_gemm(layer_backend()),
            "cpu_patches_active": compat.patched()}


def matmul_peak() -> float:
    """bf16 TFLOP/s of an 8192^3 product on random data, median of 20 after warm-up."""
    import torch

    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n ** 3 / sorted(times)[len(times) // 2] / 1e12


def oracle(out: Path) -> dict[str, Any]:
    """tests/dist_checks.py on the card: forward logits and every gradient against the
    float32 host oracle, per topology and dtype."""
    runs = {"nccl-1rank": (1, ["--foe", "1,1,1", "--moe", "1"], {}),
            "gloo-2ranks": (2, ["--foe", "1,2,1"], {"FOE_BACKEND": "gloo"})}
    report: dict[str, Any] = {}
    for dtype, limits in TOLERANCE.items():
        for name, (nproc, args, env) in runs.items():
            path = out / f"oracle-{dtype}-{name}.json"
            code, _ = launch(out, f"oracle-{dtype}-{name}", nproc, "tests.dist_checks",
                             [*args, "--dtype", dtype, "--out", str(path)], 240, env)
            if code != 0 or not path.exists():
                report[f"{dtype}/{name}"] = {"ok": False, "error": f"exit {code}"}
                continue
            for topo, modes in json.loads(path.read_text()).items():
                for mode, r in modes.items():
                    if isinstance(r, dict) and "logits_rel" in r:
                        report[f"{dtype}/{topo}/{mode}"] = {
                            "ok": r["logits_rel"] <= limits["logits"]
                            and r["grad_rel_max"] <= limits["grads"],
                            "logits_rel": r["logits_rel"], "grad_rel_max": r["grad_rel_max"],
                            "backend": name}
    return report


def training(out: Path) -> dict[str, Any]:
    """The quickstart pair, 50 bf16 steps each on one rank: the loss must fall."""
    report = {}
    for kind in ("foe", "moe"):
        run_dir = out / f"train-{kind}"
        args = ["--config", f"configs/quickstart/{kind}.yaml", "--overwrite", *ONE_RANK,
                "training.train_iters=50", "training.warmup_iters=5", "training.bf16=true",
                "training.eval_interval=0", "checkpoint.interval=0", "logging.comm_report=false",
                "logging.wandb.mode=disabled", f"logging.run_dir={run_dir}"]
        code, _ = launch(out, f"train-{kind}", 1, "foe_train.train", args, 300)
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                ] if (run_dir / "metrics.jsonl").exists() else []
        losses = [r["loss"] for r in rows if "loss" in r]
        first, last = (sum(losses[:5]) / 5, sum(losses[-5:]) / 5) if len(losses) >= 10 else (0, 0)
        report[kind] = {"ok": code == 0 and len(losses) == 50 and last < 0.8 * first,
                        "first5_loss": first, "last5_loss": last, "steps": len(losses),
                        "tokens_per_s_last": rows[-1]["tokens_per_s"] if rows else None}
    return report


def throughput(out: Path, peak_tflops: float) -> dict[str, Any]:
    """foe-bench train on the GPU-sized pair (interleaved, median over steps) and MFU from
    the recipe's FLOPs per token."""
    from foe_train.budget import budget
    from foe_train.config import load_config

    path = out / "train_bench.json"
    pair = ["configs/bench/foe.yaml", "configs/bench/moe.yaml"]
    code, _ = launch(out, "train-bench", 1, "foe_train.bench.train_bench",
                     ["--pair", *pair, "--steps", "20", "--warmup", "5", "--json", "--out",
                      str(path), *GPU_PAIR, "training.bf16=true"], 300)
    if code != 0 or not path.exists():
        return {"ok": False, "error": f"exit {code}"}
    row = json.loads(path.read_text())["rows"][0]
    report: dict[str, Any] = {"ok": True, "foe_over_moe": row["ratio"]["tokens_per_s"]}
    for kind, recipe in zip(("foe", "moe"), pair, strict=True):
        flops = budget(load_config(recipe, GPU_PAIR))["flops_per_token"]
        tokens_per_s = row[kind]["tokens_per_s"]["median"]
        report[kind] = {"tokens_per_s": tokens_per_s,
                        "tflops": flops * tokens_per_s / 1e12,
                        "mfu": flops * tokens_per_s / 1e12 / peak_tflops}
    return report


def generation(out: Path) -> dict[str, Any]:
    """foe-bench latency on the GPU-sized pair: forward, prefill (TTFT), decode (TBT)."""
    path = out / "latency.json"
    code, _ = launch(out, "latency", 1, "foe_train.bench.latency",
                     ["--pair", "configs/bench/foe.yaml", "configs/bench/moe.yaml", "--batch",
                      "1", "8", "--prompt-len", "512", "2048", "--gen-len", "16", "--reps",
                      "3", "--warmup", "1", "--json", "--out", str(path), *GPU_PAIR], 300)
    if code != 0 or not path.exists():
        return {"ok": False, "error": f"exit {code}"}
    rows = json.loads(path.read_text())["rows"]
    return {"ok": True, "rows": [
        {"batch": r["batch"], "prompt_len": r["prompt_len"],
         **{f"{kind}_{m}_ms": r[kind][m]["median"] * 1e3 for kind in ("foe", "moe")
            for m in ("forward", "ttft", "tbt")},
         "moe_over_foe": r["ratio"]} for r in rows]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True)
    out = Path(ap.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    stages = [("environment", environment), ("matmul_peak_tflops", matmul_peak),
              ("oracle", lambda: oracle(out)), ("training", lambda: training(out)),
              ("throughput", lambda: throughput(out, report["matmul_peak_tflops"])),
              ("generation", lambda: generation(out))]
    for name, stage in stages:
        try:
            report[name] = stage()
        except Exception as exc:  # record and go on: one broken stage must not hide the rest
            report[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
        print(f"{name}: {json.dumps(report[name])[:400]}", flush=True)


if __name__ == "__main__":
    main()
