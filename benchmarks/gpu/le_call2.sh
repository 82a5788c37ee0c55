# label-efficiency, call 2 on the warm machine of call 1 (caches and scratch runs under /tmp): controls + voco
set -u
[ -d /tmp/site/monai ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD SSLBENCH_DATA=/tmp/sbdata
ls /tmp/le/finetune/phantom-mmwhs 2>&1 | head
export TASKS=phantom-mmwhs LABELS=2 SEEDS="0 1 2" PRETRAIN_STEPS=500 PRETRAIN_BATCH=2 FINETUNE_STEPS=400 \
  EXTRA="--set model.feature_size=24" TASK_SETS="data.phantom_cases=20 data.val_last=10"
start=$(date +%s)
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader -l 15 > $OUT/smi.txt 2>&1 &
smi=$!
( sleep ${DEADLINE:-530}; pkill -f "sslbench (pre|fine)" ) > /dev/null 2>&1 &
dog=$!
lane() { METHODS="$1" JOBS=6 PHASE=pretrain bash benchmarks/label_efficiency.sh /tmp/le
         echo "pretrain $1 done at $(( $(date +%s) - start )) s"
         METHODS="$1" JOBS=6 PHASE=finetune bash benchmarks/label_efficiency.sh /tmp/le
         echo "finetune $1 done at $(( $(date +%s) - start )) s"; }
lane "${LANE_A:-supervised supervised-task}" > $OUT/lane-a.txt 2>&1 &
a=$!
lane "${LANE_B:-voco}" > $OUT/lane-b.txt 2>&1 &
b=$!
wait $a $b
kill $smi $dog 2>/dev/null
echo "total $(( $(date +%s) - start )) s"
cat /tmp/le/summary.txt
tail -3 /tmp/le/logs/pretrain-*.log | cut -c1-200
tar czf $OUT/le.tgz --exclude='*.pt' -C /tmp le
