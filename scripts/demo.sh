#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh), then runs DSL and CSL on Fashion-MNIST
# (LeNet-5, 3 clients, 2 rounds) and prints both results tables and their comparison.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
mkdir -p results
for algorithm in dsl csl; do
  .venv/bin/splitflower run --algorithm "$algorithm" --strategy parallel --dataset fashion-mnist \
    --model lenet5 --cut s --clients 3 --rounds 2 --out "results/demo-$algorithm.json"
done
.venv/bin/splitflower compare results/demo-dsl.json results/demo-csl.json --plot results/demo.png
