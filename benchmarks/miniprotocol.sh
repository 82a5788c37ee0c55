#!/usr/bin/env bash
# GPU mini-protocol on phantoms (issue 3's evidence): VoCo pre-training (paper form, the official batch
# geometry: 2 volumes x 2 random crops + 16 bases of 64^3, feature size 48), then fine-tuning on phantom
# MM-WHS with 2 labelled cases, against scratch with the same fine-tuning budget, for each seed given.
#   bash benchmarks/miniprotocol.sh OUT_DIR SEED [SEED ...]
# Environment: PRETRAIN_STEPS (default 1000), FINETUNE_STEPS (default 200).
set -euo pipefail
out=$1; shift
pre=${PRETRAIN_STEPS:-1000}
ft=${FINETUNE_STEPS:-200}
common=(--preset paper --out "$out"
        --set task.finetune.labeled_cases=2 --set task.finetune.max_steps="$ft"
        --set task.finetune.val_every=$((ft / 2)) --set task.finetune.checkpoint_every="$ft"
        --set task.finetune.log_every=20)
for seed in "$@"; do
  python3 -m sslbench run --method voco --task phantom-mmwhs --seed "$seed" "${common[@]}" \
      --set method.pretrain.steps="$pre" --set method.pretrain.batch_size=2 --set method.params.sw_batch_size=2 \
      --set method.pretrain.checkpoint_every="$pre" --set method.pretrain.log_every=50
  python3 -m sslbench run --method scratch --task phantom-mmwhs --seed "$seed" "${common[@]}"
done
