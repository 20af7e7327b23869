#!/usr/bin/env bash
# The autoencoder ablation behind configs/autoencoder_mtd_edge.yaml (benchmarks/results/autoencoder_mtd.md):
# one factor at a time against the old recipe, each trained for the same short budget with the stock
# trainer, then measured together against the equal-size resize.
#
#   bash benchmarks/autoencoder_ablation.sh [STEPS] [DATA]      # default 200 steps on ../shared/data/mtd
#
# Runs go to runs/ae_ablation/<name>; a finished one is skipped (rerun-safe), a killed one resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-200}
DATA=${2:-../shared/data/mtd}
PY=${PYTHON:-.venv/bin/python}
OUT=runs/ae_ablation
common=(--config configs/autoencoder_mtd_edge.yaml --set "train.data_root=$DATA" --set "train.autoencoder_steps=$STEPS"
        --set "train.checkpoint_every=$STEPS" --quiet)
# The old recipe without its perceptual term (the frozen extractor's forward and backward made a step
# several times dearer on a CPU, and the target here is fidelity): L1 + KL, constant 2e-4, 3 channels.
old_recipe=(--set model.vae.kind=kl --set model.vae.latent_channels=4 --set train.autoencoder_loss=l1
            --set train.autoencoder_lr=2e-4 --set train.autoencoder_warmup=0 --set train.autoencoder_schedule=constant)
declare -A variants=(
  [kl_f8c4_old]="${old_recipe[*]}"
  [kl_f8c4_l2_cosine]="--set model.vae.kind=kl --set model.vae.latent_channels=4"
  [anchored_f8c4]="--set model.vae.latent_channels=4"
  [anchored_f8c16]=""
  [anchored_f4c4]="--set model.vae.block_out_channels=[32,64,128] --set model.vae.latent_channels=4"
)
order=(kl_f8c4_old kl_f8c4_l2_cosine anchored_f8c4 anchored_f8c16 anchored_f4c4)
for name in "${order[@]}"; do
  run="$OUT/$name"
  if [ -f "$run/checkpoints/autoencoder-final/state.json" ]; then echo "[$name] done"; continue; fi
  resume=(); [ -d "$run/checkpoints" ] && resume=(--resume)
  echo "[$name] $(date -u +%H:%M:%S) training $STEPS steps"
  # shellcheck disable=SC2086
  "$PY" -m edgeinspect.cli train diad "${common[@]}" ${variants[$name]} --run "$run" "${resume[@]}"
done
