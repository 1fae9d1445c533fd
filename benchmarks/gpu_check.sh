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
# tests, train, eager, profile, compile, train_compile.
set -u
out=${1:-gpu_out}
steps=" ${STEPS:-tests train eager profile compile} "
for s in $steps; do
    case $s in tests|train|eager|profile|compile|train_compile) ;; *) echo "gpu_check.sh: unknown step '$s'" >&2; exit 2;; esac
done
want() { [[ $steps == *" $1 "* ]]; }
mkdir -p "$out"
export PYTHONPATH=src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, timm, transformers; print(torch.__version__, timm.__version__, transformers.__version__)" \
    | tee -a "$out/gpu.txt"
if want tests; then
    timeout 240 python3 -m pytest -q -p no:cacheprovider -rf tests/test_cuda.py > "$out/tests.txt" 2>&1
    tail -15 "$out/tests.txt"
fi
if want train; then
    timeout 100 python3 benchmarks/bench_gpu.py --output "$out/train" --match "b2 cls b64 224 bf16 train" \
        --skip-compile 2>&1 | tail -3
fi
if want eager; then
    timeout 100 python3 benchmarks/bench_gpu.py --output "$out/eager" --match "cls b1 224 bf16 infer" \
        --match "b2 cls b64 224 bf16 infer" --skip-compile 2>&1 | tail -6
fi
if want profile; then
    timeout 60 python3 benchmarks/gpu_profile.py --output "$out/profile" --cases 64t --top 30 > /dev/null 2>&1
fi
if want compile; then
    timeout 150 python3 benchmarks/gpu_compile_check.py --output "$out/compile" 2>&1 | grep -E "^(pvtv2|timm)"
fi
if want train_compile; then  # the compiled model's training step, default mode and CUDA graphs (six compilations)
    timeout 300 python3 benchmarks/bench_gpu.py --output "$out/train_compile" --match "b2 cls b64 224 bf16 train" \
        --only-compile --compile-reserve-s 0 --budget-s 280 2>&1 | tail -4
fi
rm -f "$out"/*/results.png "$out"/*/profile.json "$out"/compile/compile_check.json
