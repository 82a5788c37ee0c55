#!/usr/bin/env bash
# Every method through the whole protocol on the GPU (issue 5): `sslbench run --method M --task phantom-mmwhs`
# at the paper preset with a short pre-training (PRETRAIN_STEPS, default 300) on the phantom corpus, then the
# same fine-tuning budget as benchmarks/miniprotocol.sh (2 labelled cases, 200 steps), one seed.
#   bash benchmarks/methods_miniprotocol.sh OUT_DIR SUMMARY_FILE [METHOD ...]
set -uo pipefail
out=$1; summary=$2; shift 2
methods=("$@")
[ ${#methods[@]} -eq 0 ] && methods=(mg transvw simsiam pcrlv1 pcrlv2 mae swinunetr-ssl)
pre=${PRETRAIN_STEPS:-300}
ft=${FINETUNE_STEPS:-200}
for m in "${methods[@]}"; do
  extra=()
  [ "$m" = pcrlv2 ] && extra=(--set method.params.schedule_steps="$pre")
  start=$(date +%s)
  python3 -m sslbench run --method "$m" --task phantom-mmwhs --preset paper --seed 0 --out "$out" \
      --set task.finetune.labeled_cases=2 --set task.finetune.max_steps="$ft" \
      --set task.finetune.val_every=$((ft / 2)) --set task.finetune.checkpoint_every="$ft" \
      --set task.finetune.log_every=20 --set method.pretrain.steps="$pre" \
      --set method.pretrain.checkpoint_every="$pre" --set method.pretrain.log_every=50 "${extra[@]}" \
      > "$out.$m.log" 2>&1
  rc=$?
  dice=$(python3 -c "import json,glob;m=[json.load(open(f)) for f in glob.glob('$out/finetune/phantom-mmwhs/$m/*/metrics.json')];print(round(100*m[0]['mean_dice'],2), m[0]['init']['load']['matched'], m[0]['init']['load']['missing'])" 2>/dev/null)
  echo "$m rc=$rc dice=$dice seconds=$(( $(date +%s) - start ))" >> "$summary"
done
