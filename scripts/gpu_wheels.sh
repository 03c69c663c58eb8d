#!/usr/bin/env bash
# Fetch, on a machine with PyPI access, the wheels the GPU check needs beside a CUDA image
# that has Python 3.12 and torch but not megatron-core or pydantic; they land in .whl/
# (git-ignored), which scripts/gpu_check.sh installs from when it exists.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    megatron-core==0.16.1 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
    typing-inspection==0.4.5
ls .whl
