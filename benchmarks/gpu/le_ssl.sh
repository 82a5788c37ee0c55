#!/usr/bin/env bash
# One device call of the SSL label-efficiency runs (issue 18): installs the wheels and starts benchmarks/gpu/le_ssl.py
# under setsid on the first call of a machine (it outlives the call), then waits up to WAIT seconds (or until the
# scheduler is done) and packs the records, logs and a GPU trace into $OUT/le.tgz (no checkpoints). Call it again
# on the same warm machine to wait longer; the scheduler's DEADLINE (seconds from its start) bounds everything.
# AGAIN=1 on a warm machine whose scheduler is done starts another one on the same folder, with this call's
# METHODS / CELLS / SEEDS / DEADLINE ... and this call's tree (finished records are kept: every run is started with
# --resume). The scheduler writes SCHEDULER_DONE however it ends, after its runs have stopped.
# A first call installs wheels and packs besides waiting: WAIT=480 keeps it inside the 600-s call limit.
#   WAIT=480 DEADLINE=1250 bash benchmarks/gpu/le_ssl.sh
#   AGAIN=1 METHODS="supervised" CELLS="phantom-btcv:2" SEEDS="1 2" DEADLINE=290 FT_EST=270 WAIT=296 bash benchmarks/gpu/le_ssl.sh
set -u
le=/tmp/le
start_scheduler() {
  ( cd /tmp/repo && PYTHONPATH=/tmp/site:/tmp/repo SSLBENCH_DATA=/tmp/sbdata setsid nohup python3 benchmarks/gpu/le_ssl.py $le \
      >> $le/scheduler.log 2>&1 < /dev/null & )
}
if [ ! -e $le/STARTED ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>&1 | tail -2
  mkdir -p $le && date -u > $le/STARTED
  cp -r "$PWD" /tmp/repo     # the scheduler keeps running after this call; the next call may send a new tree
  start_scheduler
  setsid nohup nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -l 10 \
      > $le/smi.txt 2>&1 < /dev/null &
elif [ -n "${AGAIN:-}" ]; then
  if [ ! -e $le/SCHEDULER_DONE ]; then echo "AGAIN: the scheduler is still running; waiting on it instead"
  else   # the earlier scheduler's CONTROL (its moved deadline, its FT_EST) is not the new one's
    [ -e $le/CONTROL ] && mv $le/CONTROL $le/CONTROL.old
    rm -rf /tmp/repo && cp -r "$PWD" /tmp/repo   # this call's tree (the earlier scheduler is done with its own)
    rm -f $le/SCHEDULER_DONE; echo "AGAIN: a second scheduler on $le" >> $le/scheduler.log; start_scheduler
  fi
fi
[ -n "${CONTROL:-}" ] && echo "$CONTROL" | tr ' ' '\n' > $le/CONTROL   # e.g. CONTROL="FT_EST=400 MAXPROC=14"
end=$(( $(date +%s) + ${WAIT:-540} ))
while [ "$(date +%s)" -lt "$end" ] && [ ! -e $le/SCHEDULER_DONE ]; do sleep 5; done
# packed before anything is printed: a reader that closes the pipe early (| head) must not cost the records
tar czf $OUT/le.tgz --exclude='*.pt' --exclude='*.tmp' -C /tmp le
if [ "$(stat -c %s $OUT/le.tgz)" -gt 15728640 ]; then   # the device tool returns no file over 16 MiB
  echo "le.tgz is over 15 MiB: packing the records' text files alone"
  ( cd /tmp && find le -type f \( -name '*.json' -o -name '*.yaml' -o -name '*.txt' -o -name '*.csv' -o -name '*.md' \
      -o -name '*.log' -o -name '*.png' \) -size -2M ) > /tmp/le-small.txt
  tar czf $OUT/le.tgz -C /tmp -T /tmp/le-small.txt
fi
cat $le/summary.txt 2>/dev/null
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
tail -3 $le/smi.txt
for f in $le/logs/*.log; do echo "== $f"; tail -2 "$f" | cut -c1-200; done
