#!/usr/bin/env bash
# Label-efficiency mini-protocol on phantoms (issue 18, section 3), on one GPU machine:
#   1. the data: the phantom corpus (paper preset: 200 volumes) and the fine-tuning tasks, synthesised and
#      preprocessed once (`sslbench data cache`) before anything reads them in parallel;
#   2. ONE pre-training per method (seed 0), the same budget for every method: PRETRAIN_STEPS steps of
#      PRETRAIN_BATCH volumes at the paper preset (supervised: on phantom BTCV's training split;
#      supervised-task: on each fine-tuning task's own training split);
#   3. fine-tuning from that backbone (`finetune --init`) for every task x labelled cases x seed, and scratch
#      with the same fine-tuning budget and seeds; JOBS processes share the GPU.
#   bash benchmarks/label_efficiency.sh OUT_DIR
# Environment (defaults): METHODS ("scratch supervised supervised-task voco mg transvw simsiam pcrlv1 pcrlv2 mae
# swinunetr-ssl"), TASKS ("phantom-mmwhs phantom-btcv"), LABELS ("2 6"), SEEDS ("0 1 2"), PRETRAIN_STEPS (300),
# PRETRAIN_BATCH (2), FINETUNE_STEPS (200), JOBS (6), PHASE (all | pretrain | finetune), PRESET (paper), EXTRA (more --set
# arguments for every command, e.g. "--set model.feature_size=24"), TASK_SETS (keys of the fine-tuning tasks'
# recipes, e.g. "data.phantom_cases=20 data.val_last=10": passed as task.KEY to fine-tuning and to `data cache`, and
# as corpus.KEY to supervised-task's pre-training on that task). Then: sslbench report --runs OUT_DIR --out DIR.
set -uo pipefail
out=$1
methods=(${METHODS:-scratch supervised supervised-task voco mg transvw simsiam pcrlv1 pcrlv2 mae swinunetr-ssl})
tasks=(${TASKS:-phantom-mmwhs phantom-btcv})
labels=(${LABELS:-2 6})
seeds=(${SEEDS:-0 1 2})
pre=${PRETRAIN_STEPS:-300}
batch=${PRETRAIN_BATCH:-2}
ft=${FINETUNE_STEPS:-200}
jobs=${JOBS:-6}
phase=${PHASE:-all}
preset=${PRESET:-paper}
extra=(${EXTRA:-})
task_sets=(${TASK_SETS:-})
sets_as() {   # TASK_SETS as --set arguments under section $1
  local k; for k in "${task_sets[@]}"; do printf -- '--set\n%s.%s\n' "$1" "$k"; done
}
mapfile -t task_args < <(sets_as task)
mapfile -t corpus_args < <(sets_as corpus)
mkdir -p "$out/logs"
sb() { python3 -m sslbench "$@"; }

wait_slot() { while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n; done; }

backbone_of() {   # the finished pre-training's backbone of method $1 (corpus $2)
  ls "$out"/pretrain/"$1"/"$2"/*/checkpoints/backbone.pt 2>/dev/null | head -1
}

if [ "$phase" = all ] || [ "$phase" = pretrain ]; then
  needs_corpus=0
  for m in "${methods[@]}"; do case $m in scratch|supervised|supervised-task) ;; *) needs_corpus=1 ;; esac; done
  [ "$needs_corpus" = 1 ] && sb data cache --task phantom-corpus --preset "$preset" > "$out/logs/cache-corpus.log" 2>&1
  for t in "${tasks[@]}"; do sb data cache --task "$t" --preset "$preset" "${task_args[@]}" > "$out/logs/cache-$t.log" 2>&1; done
  sb data cache --task phantom-btcv --preset "$preset" > "$out/logs/cache-phantom-btcv-corpus.log" 2>&1
  for m in "${methods[@]}"; do
    [ "$m" = scratch ] && continue
    corpora=(default)
    [ "$m" = supervised-task ] && corpora=("${tasks[@]}")
    for c in "${corpora[@]}"; do
      more=()
      [ "$c" != default ] && more=(--corpus "$c" "${corpus_args[@]}")
      [ "$m" = pcrlv2 ] && more+=(--set method.params.schedule_steps="$pre")
      wait_slot
      ( start=$(date +%s)
        sb pretrain --method "$m" --preset "$preset" --seed 0 --out "$out" "${more[@]}" \
          --set method.pretrain.steps="$pre" --set method.pretrain.batch_size="$batch" \
          --set method.pretrain.checkpoint_every="$pre" --set method.pretrain.log_every=50 "${extra[@]}" \
          > "$out/logs/pretrain-$m-$c.log" 2>&1
        echo "pretrain $m $c rc=$? seconds=$(( $(date +%s) - start ))" >> "$out/summary.txt" ) &
    done
  done
  wait
fi

if [ "$phase" = all ] || [ "$phase" = finetune ]; then
  for t in "${tasks[@]}"; do
    for m in "${methods[@]}"; do
      init=()
      if [ "$m" != scratch ]; then
        corpus=$(python3 -c "from sslbench import recipes; c = recipes.load_method('$m')['pretrain']['corpus']; print('$t' if c == recipes.TASK_CORPUS else c)")
        b=$(backbone_of "$m" "$corpus")
        if [ -z "$b" ]; then echo "finetune $m $t: no backbone under $out/pretrain/$m/$corpus" >> "$out/summary.txt"; continue; fi
        init=(--init "$b")
      fi
      for l in "${labels[@]}"; do
        for s in "${seeds[@]}"; do
          wait_slot
          ( start=$(date +%s)
            sb finetune --method "$m" "${init[@]}" --task "$t" --preset "$preset" --seed "$s" --out "$out" \
              --set task.finetune.labeled_cases="$l" --set task.finetune.max_steps="$ft" \
              --set task.finetune.val_every=$((ft / 2)) --set task.finetune.checkpoint_every="$ft" \
              --set task.finetune.log_every=50 "${task_args[@]}" "${extra[@]}" > "$out/logs/finetune-$t-$m-l$l-s$s.log" 2>&1
            echo "finetune $t $m l=$l s=$s rc=$? seconds=$(( $(date +%s) - start ))" >> "$out/summary.txt" ) &
        done
      done
    done
  done
  wait
  sb report --runs "$out" --format md > "$out/report.md" 2> "$out/logs/report.err"
  sb report --runs "$out" --out "$out/rendered" > /dev/null 2>> "$out/logs/report.err"
fi
