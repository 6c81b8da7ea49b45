#!/usr/bin/env bash
# Study 2b, fine-tuned setting (GPU): fine-tune SmolLM2-135M to 16k with every method (configs/study2/
# finetune_smollm2_<method>_16k_<mode>.yaml: same 819k-token budget each), for each seed, measure each final
# model with the training-free protocol (configs/study2/smollm2_measure_finetuned.yaml: same window, same
# Positional Heads), then compare every run with the training-free points.
#
#   METHODS="yarn linear" MODES=lora SEEDS="0 1" bash scripts/study2_finetune.sh
#
# Needs runs/study2/smollm2_training_free/identification.json (python -m posheads.eval.study2 --config
# configs/study2/smollm2_training_free_cpu.yaml writes it first; on a GPU add --only none to stop there).
set -euo pipefail
METHODS=${METHODS:-"linear ntk yarn llama3 longrope"}
MODES=${MODES:-"lora full"}
SEEDS=${SEEDS:-"0 1"}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1}
runs=()
for mode in $MODES; do
  for method in $METHODS; do
    for seed in $SEEDS; do
      name="study2-smollm2-${method}-16k-${mode}-s${seed}"
      if [ ! -f "runs/${name}/report.json" ]; then
        python train.py --config "configs/study2/finetune_smollm2_${method}_16k_${mode}.yaml" \
          --seed_everything "${seed}" --run.name "${name}"
      fi
      python -m posheads.eval.study2 --config configs/study2/smollm2_measure_finetuned.yaml \
        --model "runs/${name}/final" --output_dir "runs/${name}/study2"
      runs+=("runs/${name}")
    done
  done
done
python -m posheads.lit.compare_methods runs/study2/smollm2_training_free "${runs[@]}" --out runs/study2/compare_all
