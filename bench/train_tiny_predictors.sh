#!/usr/bin/env bash
# Trains and evaluates the predictors shipped beside models/tiny-qwen3moe.gguf
# (models/tiny-qwen3moe.pred.gguf), as README's "Expert predictors" reports them.
# Calibration text: the model's own stdlib corpus (bench/train_tiny_moe.py's file list);
# the predictors' held-out tokens are a block split of the recording (qmoe/predictor/calib_data.py).
set -euo pipefail
cd "$(dirname "$0")/.."
mapfile -t FILES < <(python -c "from bench.train_tiny_moe import stdlib_corpus_files; print('\n'.join(map(str, stdlib_corpus_files()[1])))")
rm -rf out/calib-tiny && mkdir -p out bench/results
qmoe calibrate models/tiny-qwen3moe.gguf --text "${FILES[@]}" --tokens 250000 -o out/calib-tiny
qmoe train-predictors models/tiny-qwen3moe.gguf --data out/calib-tiny --epochs 10 --type q8_0 \
    --cross-layer-output out/tiny-qwen3moe.xlayer.pred.gguf
qmoe eval-predictors models/tiny-qwen3moe.gguf --data out/calib-tiny --cross-layer out/tiny-qwen3moe.xlayer.pred.gguf \
    --json bench/results/tiny-predictors-eval.json --plot bench/results/tiny-predictors-eval.png
