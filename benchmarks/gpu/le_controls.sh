#!/usr/bin/env bash
# Label-efficiency controls in ONE device call on a fresh machine (issue 18): caches, then scratch fine-tunings
# alongside the two control pre-trainings, then the controls' fine-tunings; a watchdog stops everything at DEADLINE s.
# SCRATCH=0 leaves the scratch lane out (a second call for the controls alone).
#   bash benchmarks/gpu/le_controls.sh        (on the device; writes $OUT/le.tgz without checkpoints)
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD SSLBENCH_DATA=/tmp/sbdata
export TASKS=phantom-mmwhs LABELS=2 SEEDS="${SEEDS:-0 1 2}" PRETRAIN_STEPS=500 PRETRAIN_BATCH=2 FINETUNE_STEPS=400 \
  EXTRA="--set model.feature_size=24" TASK_SETS="data.phantom_cases=20 data.val_last=10"
le=/tmp/le; mkdir -p $le/logs
start=$(date +%s)
t() { echo "$1 at $(( $(date +%s) - start )) s"; }
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader -l 15 > $OUT/smi.txt 2>&1 < /dev/null &
smi=$!
( sleep ${DEADLINE:-560}; pkill -f "sslbench (pre|fine)" ) > /dev/null 2>&1 < /dev/null &
dog=$!
python3 -m sslbench data cache --task phantom-mmwhs --preset paper --set task.data.phantom_cases=20 \
  --set task.data.val_last=10 > $le/logs/cache-mmwhs.log 2>&1
t "cache mmwhs"
[ "${SCRATCH:-1}" = 1 ] && ( METHODS=scratch JOBS=3 PHASE=finetune bash benchmarks/label_efficiency.sh $le; t "scratch finetunes" ) > $OUT/lane-scratch.txt 2>&1 &
a=$!; [ "${SCRATCH:-1}" = 1 ] || a=
( METHODS="supervised supervised-task" JOBS=6 PHASE=pretrain bash benchmarks/label_efficiency.sh $le; t "control pretrain"
  METHODS="supervised supervised-task" JOBS=6 PHASE=finetune bash benchmarks/label_efficiency.sh $le; t "control finetunes" ) > $OUT/lane-controls.txt 2>&1 &
b=$!
wait $a $b 2>/dev/null
kill $smi $dog 2>/dev/null
t total
cat $le/summary.txt
for f in $le/logs/*.log; do echo "== $f"; tail -2 "$f" | cut -c1-240; done
tar czf $OUT/le.tgz --exclude='*.pt' -C /tmp le
