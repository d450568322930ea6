#!/bin/bash
# The expert store's CUDA checks as one prepared run for a machine with a GPU (issue 6, item 8):
# the CUDA tests, then bench/offload.py with the fast tier in GPU memory (tiers gpu and flash).
#
#   OUT=out/gpu bash bench/gpu_offload.sh        # ~6 minutes on one H200 with 16 cores
#
# It needs python3 with CUDA torch, numba, numpy, sentencepiece, matplotlib and pytest. gguf-py,
# where that python lacks it, comes as a wheel in .whl/ (pip download --no-deps gguf==0.19.0 -d
# .whl). The a3b model is written again there (bench/random_moe.py writes the same bytes every
# time); its predictors are trained there (a few minutes) unless a copy of
# ~/.cache/qmoe-bench/qwen3-a3b-shapes-random-4l.pred.gguf is in .carry/.
set -eo pipefail
out=${OUT:-out/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/qmoe-site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/qmoe-site"
fi
cache="${XDG_CACHE_HOME:-$HOME/.cache}/qmoe-bench"
mkdir -p "$cache"
if compgen -G ".carry/*.pred.gguf" >/dev/null; then
    cp .carry/*.pred.gguf "$cache/"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__)"
python3 -m pytest -q -rs tests/test_store.py -k cuda 2>&1 | tee "$out/cuda-tests.log"
python3 bench/offload.py --device cuda --models a3b tiny --budgets 10 25 50 --repeats 2 --out "$out" \
    2>&1 | tee "$out/offload.log"
