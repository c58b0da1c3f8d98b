#!/usr/bin/env bash
# The GPU checks in one script, for a machine with a CUDA device:
# the CUDA tests, host cost per site, the gate's and the pool's kernel timings, the benchmark
# tables, the compiled table and a profile, in at most 8 files under OUT_DIR.
# Usage (from the repository root):  bash benchmarks/cuda_check.sh [OUT_DIR]
# It needs no package index: the project is installed without build isolation or dependencies
# (torch, torchvision, tqdm, matplotlib, pytest and hypothesis must be installed), and the peers
# from wheels in .whl/ when present (else their rows say so).
# Every step has its own time limit, so one that hangs costs its slot, not the run.
# Switches: SWEEP=1 (Triton block sizes), KERNELS=0 (skip the gate and pool kernel timings), PLOT=0, COMPILE=0, PROFILE=0,
# REPEATS=n, DEADLINE=seconds, MODELS="resnet50 googlenet" (the eager tables).
# A dry run on a CPU machine: DEVICE=cpu BATCH=1 COMPILE=0 bash benchmarks/cuda_check.sh /tmp/dry
set -uo pipefail
out=${1:-${OUT:-cuda-results}}
dev=${DEVICE:-cuda}
batch=${BATCH:-32}
mkdir -p "$out" /tmp/bench
export PYTHONUNBUFFERED=1
py=$(command -v python3 || command -v python)
deadline=${DEADLINE:-540}  # seconds from the start by which every step must be done
step() {
    local limit=$1; shift
    local left=$((deadline - SECONDS - 5))
    [ "$left" -lt "$limit" ] && limit=$left
    [ "$limit" -le 0 ] && { echo "== skipped (no time left): $*"; return; }
    echo "== $* (limit ${limit}s)"; timeout "$limit" "$@"; echo "== exit $?"
}
merge_json() {  # every bench JSON of this run in one file (few files come back from the GPU machine)
    "$py" -c "import glob, json, sys; json.dump({p.split('/')[-1][:-5]: json.load(open(p)) \
for p in sorted(glob.glob('/tmp/bench/*.json'))}, sys.stdout, indent=1)" >"$out/bench.json"
}

# Setup without a pipe, so the exports stay in this shell.
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    if ls .whl/*.whl >/dev/null 2>&1; then
        "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    fi
    "$py" -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -2
} >"$out/setup.txt" 2>&1
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site
"$py" -c "import excitation" 2>/dev/null || export PYTHONPATH=$PWD:${PYTHONPATH:-}
"$py" -c "import torch, excitation; from excitation.kernels.ops import triton_available as t; \
print('torch', torch.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(), 'triton path', t())" \
    >>"$out/setup.txt" 2>&1
cat "$out/setup.txt"

sweep=""; [ "${SWEEP:-0}" = 1 ] && sweep="--sweep"
step 180 "$py" -m pytest -q -p no:cacheprovider tests/test_triton.py tests/test_guarantees.py tests/test_runtimes.py tests/test_fusion.py \
    -k "cuda and not densenet and not resnet50" 2>&1 | tail -4 | tee -a "$out/setup.txt"
# Which configurations torch.compile gets right here (flags a zero or wrong compiled pullback).
step 150 "$py" benchmarks/compile_probe.py --device "$dev" 2>&1 | grep -v "warn" | tee -a "$out/setup.txt"
{
    step 60 "$py" benchmarks/site_overhead.py --device "$dev"
    if [ "${KERNELS:-1}" = 1 ]; then
        step 120 "$py" benchmarks/gate_bandwidth.py --device "$dev" $sweep
    fi
} 2>&1 | tee "$out/bandwidth.md"
if [ "${KERNELS:-1}" = 1 ]; then
    step 120 "$py" benchmarks/pool_backward.py --device "$dev" --batch "$batch" $sweep 2>&1 | tee "$out/pools.md"
fi
{
    for model in ${MODELS:-resnet50 vgg11_bn densenet121 googlenet}; do
        step 90 "$py" -m excitation.cli bench --model "$model" --batch "$batch" --device "$dev" --repeats "${REPEATS:-20}" \
            --no-progress --json "/tmp/bench/$model-$dev.json"
    done
    if [ "${PLOT:-1}" = 1 ]; then
        step 120 "$py" benchmarks/plot_batch.py --device "$dev" --batches 1 8 32 128 --out "$out/perf_batch_$dev.png"
    fi
} 2>&1 | grep -v "warn" | tee "$out/bench.md"
merge_json
if [ "${COMPILE:-1}" = 1 ]; then
    # Three Inductor compiles (vanilla, ours, ours unfused with the uint8 gate): the longest step.
    step 300 "$py" -m excitation.cli bench --model resnet50 --batch "$batch" --device "$dev" --compile --no-peers \
        --repeats "${REPEATS:-20}" --no-progress --json "/tmp/bench/resnet50-$dev-compiled.json" 2>&1 | grep -v "warn" \
        | tee "$out/compiled.md"
    merge_json
fi
if [ "${PROFILE:-1}" = 1 ]; then
    step 60 "$py" benchmarks/profile_pullback.py --device "$dev" --batch "$batch" >"$out/profile.txt" 2>&1 || true
fi
