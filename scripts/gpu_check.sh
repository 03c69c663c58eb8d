#!/usr/bin/env bash
# The CUDA path on one GPU in one prepared run (< 8 minutes on an H100/H200): oracle
# equivalence in fp32 and bf16, 50 bf16 training steps of the quickstart pair, training
# tokens/s and MFU against the card's measured matmul peak, prefill/decode of both members.
# Writes $OUT/gpu_check.json (and each stage's log). Wheels missing from the image go in .whl/
# (scripts/gpu_wheels.sh); they are installed into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder for gpu_check.json}"
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
exec python3 scripts/gpu_check.py --out "$OUT"
