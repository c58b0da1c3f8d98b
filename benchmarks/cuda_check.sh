#!/usr/bin/env bash
# The one prepared script for a session that is lent a GPU (see the device tool's README):
# kernel and runtime tests on CUDA, the gate's bandwidth, then the benchmark tables.
# Usage (from the repository root):  bash benchmarks/cuda_check.sh [OUT_DIR]
set -uo pipefail
out=${1:-${OUT:-cuda-results}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python -m pip install -q -e ".[dev,bench]" 2>&1 | tail -1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
python -m pytest -q -p no:cacheprovider tests/test_triton.py tests/test_kernels.py \
    "tests/test_runtimes.py::test_compile_cuda" "tests/test_guarantees.py::test_cuda_matches_cpu" 2>&1 | tail -15 | tee "$out/tests.txt"
python benchmarks/gate_bandwidth.py --device cuda 2>&1 | tee "$out/bandwidth.md"
# Compiling costs minutes: only resnet50 gets the compiled rows.
for model in resnet50 vgg11_bn densenet121; do
    extra=""; [ "$model" = resnet50 ] && extra="--compile"
    excitation bench --model "$model" --batch 32 --device cuda $extra --repeats 20 --no-progress \
        --json "$out/$model-cuda.json" 2>/dev/null | tee "$out/$model-cuda.md"
done
