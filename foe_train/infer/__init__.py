"""Inference: KV-cached generation for FoE and the MoE baseline (``generate``), with prefill
and decode-step hooks for latency benchmarks."""
