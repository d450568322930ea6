#!/usr/bin/env bash
# Trains and evaluates the predictors shipped beside models/tiny-qwen3moe.gguf
# (models/tiny-qwen3moe.pred.gguf), as README's "Expert predictors" reports them.
# Calibration text: 1M tokens of the model's own training files (bench/train_tiny_moe.py's
# training split of the stdlib corpus); the predictors' held-out tokens are a block split of the
# recording (qmoe/predictor/calib_data.py). Width: the default, min(1024, n_embd) = 256.
# About 30 minutes on one core of the development machines.
set -euo pipefail
cd "$(dirname "$0")/.."
mapfile -t FILES < <(python -c "from bench.train_tiny_moe import split_by_file, stdlib_corpus_files; print('\n'.join(map(str, split_by_file(stdlib_corpus_files()[1])[0])))")
rm -rf out/calib-1m && mkdir -p out bench/results
qmoe calibrate models/tiny-qwen3moe.gguf --text "${FILES[@]}" --tokens 1000000 -o out/calib-1m -t 1
qmoe train-predictors models/tiny-qwen3moe.gguf --data out/calib-1m --epochs 10 --type q8_0 --device cpu \
    --cross-layer-output out/tiny-qwen3moe.xlayer.pred.gguf
qmoe eval-predictors models/tiny-qwen3moe.gguf --data out/calib-1m --cross-layer out/tiny-qwen3moe.xlayer.pred.gguf \
    --json bench/results/tiny-predictors-eval.json --plot bench/results/tiny-predictors-eval.png
python -m bench.predictors --ceiling-only --data out/calib-1m
