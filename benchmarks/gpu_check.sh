#!/usr/bin/env bash
# The GPU checks in one call, on a CUDA machine, from the repository root (PyTorch, timm and transformers installed):
# the GPU tests, the B2 training step against timm and transformers, the kernels of a training step, and the kernels
# of pvtv2 and timm under torch.compile. Each step has its own time limit; everything is written under $1.
#
#     bash benchmarks/gpu_check.sh /tmp/gpu_out
set -u
out=${1:-gpu_out}
mkdir -p "$out"
export PYTHONPATH=src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton, timm, transformers; print(torch.__version__, triton.__version__, timm.__version__, transformers.__version__)" | tee -a "$out/gpu.txt"
timeout 200 python3 -m pytest -q -p no:cacheprovider -rf tests/test_cuda.py 2>&1 | tail -20 | tee "$out/tests.txt"
timeout 100 python3 benchmarks/bench_gpu.py --output "$out/train" --match "b2 cls b64 224 bf16 train" 2>&1 | tail -4
timeout 100 python3 benchmarks/bench_gpu.py --output "$out/eager" --match "cls b1 224 bf16 infer" \
    --match "b2 cls b64 224 bf16 infer" --skip-compile 2>&1 | tail -8
timeout 60 python3 benchmarks/gpu_profile.py --output "$out/prof_train" --cases 64t --top 30 > /dev/null 2>&1
[ -f benchmarks/gpu_dwconv_train.py ] && timeout 60 python3 benchmarks/gpu_dwconv_train.py 2>&1 | tail -5
timeout 200 python3 benchmarks/gpu_profile.py --compile --output "$out/prof_compile" --cases 64 --top 40 > /dev/null 2>&1
rm -f "$out"/*/results.png "$out"/*/profile.json  # what comes back from a device call is limited in files
head -c 2500 "$out/prof_train/profile.txt"; echo; head -c 5000 "$out/prof_compile/profile.txt"
