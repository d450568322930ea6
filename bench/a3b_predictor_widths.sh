#!/usr/bin/env bash
# Predictor width on the Qwen3-30B-A3B layer shapes: the offload bench's random model
# (bench/offload.py writes it into ~/.cache/qmoe-bench), 20k calibration tokens of
# standard-library text, 10 epochs, widths 512 / 1024 / 2048; results in
# bench/results/predictors/a3b-widths/ (README "Expert predictors"). About 10 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
M=$(python -c "from bench.offload import a3b_model; print(a3b_model())")
mapfile -t FILES < <(python -c "from bench.offload import stdlib_texts; print('\n'.join(map(str, stdlib_texts(12))))")
OUT=bench/results/predictors/a3b-widths
rm -rf out/calib-a3b && mkdir -p out "$OUT"
qmoe calibrate "$M" --text "${FILES[@]}" --tokens 20000 -o out/calib-a3b
for H in 512 1024 2048; do
  qmoe train-predictors "$M" --data out/calib-a3b --hidden $H --epochs 10 --device cpu --type q8_0 -o out/a3b-$H.pred.gguf
  qmoe eval-predictors "$M" --data out/calib-a3b --predictors out/a3b-$H.pred.gguf --json "$OUT/a3b-$H-eval.json"
done
