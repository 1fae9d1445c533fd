#!/usr/bin/env bash
# The GPU checks in one call, on a CUDA machine, from the repository root (PyTorch, timm and transformers installed):
# the GPU tests, the B2 training step and eager inference against timm and transformers, the kernels of a training
# step, and pvtv2 against timm under torch.compile. Each step has its own time limit (about 8 minutes in all);
# everything is written under $1, at most 8 files (what a lent machine sends back).
#
#     bash benchmarks/gpu_check.sh /tmp/gpu_out
set -u
out=${1:-gpu_out}
mkdir -p "$out"
export PYTHONPATH=src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, timm, transformers; print(torch.__version__, timm.__version__, transformers.__version__)" \
    | tee -a "$out/gpu.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider -rf tests/test_cuda.py > "$out/tests.txt" 2>&1
tail -15 "$out/tests.txt"
timeout 100 python3 benchmarks/bench_gpu.py --output "$out/train" --match "b2 cls b64 224 bf16 train" 2>&1 | tail -3
timeout 100 python3 benchmarks/bench_gpu.py --output "$out/eager" --match "cls b1 224 bf16 infer" \
    --match "b2 cls b64 224 bf16 infer" --skip-compile 2>&1 | tail -6
timeout 60 python3 benchmarks/gpu_profile.py --output "$out/profile" --cases 64t --top 30 > /dev/null 2>&1
timeout 150 python3 benchmarks/gpu_compile_check.py --output "$out/compile" 2>&1 | grep -E "^(pvtv2|timm)"
rm -f "$out"/*/results.png "$out"/*/profile.json "$out"/compile/compile_check.json
