#!/usr/bin/env bash
# GPU mini-protocol on phantoms (issue 3's evidence): ONE VoCo pre-training (paper form, 64^3 crops, 4 x 4
# bases, feature size 48), then fine-tuning on phantom MM-WHS with 2 labelled cases from its backbone for
# every seed given, against scratch with the same fine-tuning budget and seeds.
#   bash benchmarks/miniprotocol.sh OUT_DIR SEED [SEED ...]
# Environment: PRETRAIN_STEPS (default 3000), FINETUNE_STEPS (default 200), GPUS (default 1: processes of
# the pre-training under torchrun), BATCH_PER_RANK (default 2 / GPUS: the global batch stays 2 volumes, as
# in the official pre-training). Scratch runs go to the last GPU while pre-training runs; VoCo fine-tunings
# are spread over the GPUs afterwards.
set -euo pipefail
out=$1; shift
pre=${PRETRAIN_STEPS:-3000}
ft=${FINETUNE_STEPS:-200}
gpus=${GPUS:-1}
per_rank=${BATCH_PER_RANK:-$(( 2 / gpus > 0 ? 2 / gpus : 1 ))}
last=$((gpus - 1))
common=(--task phantom-mmwhs --preset paper --out "$out"
        --set task.finetune.labeled_cases=2 --set task.finetune.max_steps="$ft"
        --set task.finetune.val_every=$((ft / 2)) --set task.finetune.checkpoint_every="$ft"
        --set task.finetune.log_every=20)

# phantom MM-WHS first (synthesised once, before anything reads it in parallel)
python3 -m sslbench data check --task phantom-mmwhs > "$out.check.log" 2>&1 || true
(
  for seed in "$@"; do
    CUDA_VISIBLE_DEVICES=$last python3 -m sslbench run --method scratch --seed "$seed" "${common[@]}"
  done
) > "$out.scratch.log" 2>&1 &
scratch=$!

launch=()
[ "$gpus" -gt 1 ] && launch=(--gpus "$gpus")
python3 -m sslbench pretrain --method voco --preset paper --out "$out" "${launch[@]}" \
    --set method.pretrain.steps="$pre" --set method.pretrain.batch_size="$per_rank" \
    --set method.params.sw_batch_size=2 --set method.pretrain.checkpoint_every="$pre" \
    --set method.pretrain.log_every=100
backbone=$(ls "$out"/pretrain/voco/phantom-corpus/*/checkpoints/backbone.pt | head -1)

i=0
pids=()
for seed in "$@"; do
  CUDA_VISIBLE_DEVICES=$((i % gpus)) python3 -m sslbench finetune --init "$backbone" --method voco --seed "$seed" \
      "${common[@]}" > "$out.voco-s$seed.log" 2>&1 &
  pids+=($!)
  i=$((i + 1))
done
for p in "${pids[@]}"; do wait "$p"; done
wait "$scratch"
python3 -m sslbench report --runs "$out" --format md
