#!/usr/bin/env bash
# Issue 23's GPU evidence in one warm machine (device tool, carry [".whl"]): the first call installs the wheels,
# times 2D pre-training of every Table 4 method alone (`sslbench bench pretrain2d`, batch 64, 224 px: PCRL's 2D
# setting), then starts benchmarks/table4.sh under setsid (it outlives the call): the eight rows x SEEDS on the
# phantom ChestX-ray14 twin. Every call waits up to WAIT seconds (or until table4.sh is done) and packs the
# results (no checkpoints) into $OUT/t4.tgz. Call it again on the same warm machine to wait longer.
#   WAIT=560 bash benchmarks/gpu/table4.sh
# The pre-training budget is one number of steps for every method (batch 64), chosen before any row runs from the
# measured step times so that the summed pre-training time of all methods x seeds, each alone on the GPU, is
# about PRE_BUDGET seconds (default 600; clamped to [200, 2000] steps, a multiple of 100); PRETRAIN_STEPS
# overrides it. JOBS (processes sharing the GPU) follows the measured peak memory (at most 6).
set -u
t4=/tmp/t4
if [ ! -e $t4/STARTED ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>&1 | tail -2
  mkdir -p $t4 && date -u > $t4/STARTED
  cp -r "$PWD" /tmp/repo
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $t4/card.txt 2>&1
  nproc >> $t4/card.txt
  cd /tmp/repo
  export PYTHONPATH=/tmp/site:/tmp/repo SSLBENCH_DATA=/tmp/sbdata
  python3 -m sslbench bench pretrain2d --batch 64 --size 224 224 --steps 30 --warmup 5 --json $t4/throughput.json \
      > $t4/throughput.txt 2> $t4/throughput.err
  echo "throughput rc=$? at $(date -u +%H:%M:%S)" >> $t4/card.txt
  read -r steps jobs < <(python3 - "$t4/throughput.json" "${PRE_BUDGET:-600}" "${SEEDS:-0 1 2}" <<'PY'
import json, sys
rows = [r for r in json.load(open(sys.argv[1])) if "step_s" in r]
seeds = len(sys.argv[3].split())
total = sum(r["step_s"] for r in rows) * seeds
steps = int(float(sys.argv[2]) / total) // 100 * 100 if total else 500
peak = max([r["peak_gib"] for r in rows] or [20.0])
print(min(max(steps, 200), 2000), max(1, min(6, int(70 // (peak * 1.3)))))
PY
)
  steps=${PRETRAIN_STEPS:-$steps}
  echo "pre-training budget: $steps steps of batch 64 per method and seed; JOBS=$jobs" | tee -a $t4/card.txt
  setsid nohup nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -l 10 \
      > $t4/smi.txt 2>&1 < /dev/null &
  ( PRETRAIN_STEPS=$steps JOBS=${JOBS:-$jobs} FINETUNE_STEPS=${FINETUNE_STEPS:-1000} setsid nohup bash -c \
      "bash benchmarks/table4.sh $t4/run; date -u > $t4/DONE" > $t4/table4.log 2>&1 < /dev/null & )
  cd - > /dev/null
fi
end=$(( $(date +%s) + ${WAIT:-540} ))
while [ "$(date +%s)" -lt "$end" ] && [ ! -e $t4/DONE ]; do sleep 5; done
cat $t4/card.txt $t4/throughput.txt 2>/dev/null
cat $t4/run/summary.txt 2>/dev/null
tail -2 $t4/smi.txt
for f in $t4/run/logs/*.log; do [ -e "$f" ] && { echo "== $f"; tail -1 "$f" | cut -c1-160; }; done
tar czf $OUT/t4.tgz --exclude='*.pt' --exclude='t4/run/data' -C /tmp t4   # the phantom images: written again by synth
