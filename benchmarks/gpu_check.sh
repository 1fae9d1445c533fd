#!/usr/bin/env bash
# The GPU checks in one call, on a CUDA machine, from the repository root (PyTorch, timm and transformers installed):
# the GPU tests, the B2 training step and eager inference against timm and transformers, the kernels of a training
# step, pvtv2 against timm under torch.compile, and the training step of compiled models. Each step has its own time
# limit; everything is written under $1, at most 8 files (what a lent machine sends back).
#
#     bash benchmarks/gpu_check.sh /tmp/gpu_out                                   # tests train eager profile compile
#     STEPS="tests train_compile" bash benchmarks/gpu_check.sh /tmp/gpu_out       # a choice of steps
#
# Steps (STEPS, in this order; the default, about 8 minutes, leaves out train_compile, about 4 more):
# tests, train, eager, profile, compile, train_compile. Exits 2 on a STEPS that names an unknown step or none, and 3
# where there is no GPU (no nvidia-smi, or PyTorch sees no CUDA device), before writing anything.
set -u
set -f  # STEPS is split at whitespace and never expanded as file names (STEPS="*" is an unknown step)
out=${1:-gpu_out}
# The chosen steps as " a b c ", one space around each, whatever whitespace (tabs, newlines) separated them in STEPS.
steps=" "
for s in ${STEPS:-tests train eager profile compile}; do
    case $s in tests|train|eager|profile|compile|train_compile) ;; *) echo "gpu_check.sh: unknown step '$s'" >&2; exit 2;; esac
    steps+="$s "
done
if [[ $steps == " " ]]; then
    echo "gpu_check.sh: STEPS names no step (tests train eager profile compile train_compile)" >&2
    exit 2
fi
want() { [[ $steps == *" $1 "* ]]; }
# Fail at once, before writing anything, where there is no GPU: every step would fail on its own, one after another.
if ! command -v nvidia-smi > /dev/null 2>&1; then
    echo "gpu_check.sh: no nvidia-smi here: these checks need a CUDA machine (on the CPU: bench_gpu.py --dry-run)" >&2
    exit 3
fi
if ! python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: python3's PyTorch sees no CUDA device" >&2
    exit 3
fi
mkdir -p "$out"
export PYTHONPATH=src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, timm, transformers; print(torch.__version__, timm.__version__, transformers.__version__)" \
    | tee -a "$out/gpu.txt"
# Each step's exit status (its first command's, not the filter's after it) goes into gpu.txt; the script exits 1
# if any step failed (124: its time limit).
failed=""
status() {
    echo "step $1: exit $2" | tee -a "$out/gpu.txt"
    [[ $2 == 0 ]] || failed+=" $1"
}
if want tests; then
    timeout 240 python3 -m pytest -q -p no:cacheprovider -rf tests/test_cuda.py > "$out/tests.txt" 2>&1
    status tests $?
    tail -15 "$out/tests.txt"
fi
if want train; then
    timeout 100 python3 benchmarks/bench_gpu.py --output "$out/train" --match "b2 cls b64 224 bf16 train" \
        --skip-compile 2>&1 | tail -3
    status train "${PIPESTATUS[0]}"
fi
if want eager; then
    timeout 100 python3 benchmarks/bench_gpu.py --output "$out/eager" --match "cls b1 224 bf16 infer" \
        --match "b2 cls b64 224 bf16 infer" --skip-compile 2>&1 | tail -6
    status eager "${PIPESTATUS[0]}"
fi
if want profile; then
    timeout 60 python3 benchmarks/gpu_profile.py --output "$out/profile" --cases 64t --top 30 > /dev/null 2>&1
    status profile $?
fi
if want compile; then
    timeout 150 python3 benchmarks/gpu_compile_check.py --output "$out/compile" 2>&1 | grep -E "^(pvtv2|timm)"
    status compile "${PIPESTATUS[0]}"
fi
if want train_compile; then  # the compiled model's training step, default mode and CUDA graphs (six compilations)
    timeout 300 python3 benchmarks/bench_gpu.py --output "$out/train_compile" --match "b2 cls b64 224 bf16 train" \
        --only-compile --compile-reserve-s 0 --budget-s 280 2>&1 | tail -4
    status train_compile "${PIPESTATUS[0]}"
fi
rm -f "$out"/*/results.png "$out"/*/profile.json "$out"/compile/compile_check.json
if [[ -n $failed ]]; then
    echo "gpu_check.sh: failed:$failed" >&2
    exit 1
fi
