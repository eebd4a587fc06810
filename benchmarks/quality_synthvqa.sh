#!/usr/bin/env bash
# The exact pipeline behind the embedded SynthVQA model and benchmarks/results/synthvqa_quality_*:
# data -> base model (from scratch) -> two-stage heads (vtprune train, two budgets) -> evaluation
# of every policy at equal budgets. CPU: about 1.5 h on 2 cores (most of it the base model).
#   bash benchmarks/quality_synthvqa.sh [DATA_DIR] [RUNS_DIR]
set -euo pipefail
DATA=${1:-data/synthvqa}
RUNS=${2:-runs}
MODEL=vtprune/assets/synthvqa-llava
STEPS_HEADS=${STEPS_HEADS:-400}

python -m vtprune.quality.synthvqa --out "$DATA" --train 2000 --val 0 --test 500
python -m vtprune.quality.train_base --out "$MODEL" --steps-a 300 --steps-b 1500
for budget in 163 64; do
  rm -rf "$RUNS/synthvqa_$budget"
  vtprune train --model "$MODEL" --config configs/synthvqa_two_stage_$budget.yaml --data "$DATA/train.jsonl" \
      --out "$RUNS/synthvqa_$budget" --steps "$STEPS_HEADS" --batch-size 8 --save-every 100 --no-progress
  cp "$RUNS/synthvqa_$budget/pruning.safetensors" "$MODEL/pruning_$budget.safetensors"
  sed "s#^weights: .*#weights: pruning_$budget.safetensors#" "$RUNS/synthvqa_$budget/pruning.yaml" > "$MODEL/pruning_$budget.yaml"
done
out=benchmarks/results/synthvqa_quality_$(python -c "import platform; print(platform.machine())")_$(date +%F)
vtprune eval --model "$MODEL" --data "$DATA/test.jsonl" --compare --pruning "$MODEL/pruning_163.yaml" \
    --pruning "$MODEL/pruning_64.yaml" --out "$out" --no-progress
