#!/usr/bin/env bash
# Issue 22's GPU measurements in one warm machine: the first call installs the wheels and starts the stages below
# under setsid (they outlive the call); every call then waits up to WAIT seconds (or until all stages are done) and
# packs the results into $OUT/cs.tgz. Call it again on the same warm machine to wait longer.
#   WAIT=560 bash benchmarks/gpu/corpus_scale.sh        (device tool: carry [".whl"])
# Stages (each appends "stage <name> rc=<rc> seconds=<s>" to summary.txt; JSON of every bench row in json/):
#   cache      sslbench data cache of 500 phantom-corpus volumes at the paper preset (1.5 mm), timed
#   voco-*     bench pretrain VoCo paper eager: synthetic volumes, then --from-disk (the streamed cache), then
#              teacher-student compiled --from-disk, then the loader alone with one worker (volumes/s per core)
#   ssl-*, mg-* bench pretrain SwinUNETR-SSL and Models Genesis: synthetic, then --from-disk
#   ft-*       sslbench finetune scratch on phantom BTCV (paper preset, 100 steps): memory loader, then stream
#   memory     (MEMORY=1 only) benchmarks/stream_memory.py on the host's CPUs: 500 vs 2,000 small volumes
set -u
cs=/tmp/cs
if [ ! -e $cs/STARTED ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>&1 | tail -2
  mkdir -p $cs/json $cs/logs && date -u > $cs/STARTED
  cp -r "$PWD" /tmp/repo
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $cs/card.txt 2>&1
  nproc >> $cs/card.txt
  cat > $cs/stages.sh <<'EOS'
set -u
cs=/tmp/cs; cd /tmp/repo
export PYTHONPATH=/tmp/site:/tmp/repo SSLBENCH_DATA=/tmp/sbdata SSLBENCH_CACHE=/tmp/sbcache
stage() { local name=$1; shift; local t=$(date +%s)
  "$@" > $cs/logs/$name.log 2>&1; local rc=$?
  echo "stage $name rc=$rc seconds=$(( $(date +%s) - t )) at $(date -u +%H:%M:%S)" >> $cs/summary.txt; }
bench() { local name=$1; shift; stage $name python3 -m sslbench bench pretrain --steps 20 --warmup 3 --json $cs/json/$name.json "$@"; }
disk=(--from-disk --corpus phantom-corpus --corpus-cases 500)
stage cache python3 -m sslbench data cache --task phantom-corpus --preset paper --set corpus.data.phantom_cases=500
bench voco-disk --method voco --variant paper "${disk[@]}"
bench ssl-disk --method swinunetr-ssl "${disk[@]}"
bench mg-disk --method mg "${disk[@]}"
bench voco-ts-compiled-disk --method voco --variant teacher-student --compile "${disk[@]}"
bench voco-synthetic --method voco --variant paper
ft=(finetune --method scratch --task phantom-btcv --preset paper --seed 0 --out $cs/ft --no-feasibility-check
    --set task.finetune.max_steps=100 --set task.finetune.val_every=100 --set task.finetune.checkpoint_every=100
    --set task.finetune.log_every=25)
stage ft-stream python3 -m sslbench "${ft[@]}" --set task.finetune.loader=stream
bench ssl-synthetic --method swinunetr-ssl
bench mg-synthetic --method mg
stage voco-disk-1worker python3 -m sslbench bench pretrain --method voco --variant paper --steps 10 --warmup 2 \
  "${disk[@]}" --loader-workers 1 --json $cs/json/voco-disk-1worker.json
stage ft-memory python3 -m sslbench "${ft[@]}"
[ -n "${MEMORY:-}" ] && stage memory python3 benchmarks/stream_memory.py --counts 500 2000 --control 500 2000 \
  --repeats 2 --work /tmp/smem --json $cs/json/stream-memory.json
touch $cs/DONE
EOS
  ( setsid nohup bash $cs/stages.sh > $cs/stages.log 2>&1 < /dev/null & )
  setsid nohup nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -l 5 \
      > $cs/smi.txt 2>&1 < /dev/null &
fi
end=$(( $(date +%s) + ${WAIT:-540} ))
while [ "$(date +%s)" -lt "$end" ] && [ ! -e $cs/DONE ]; do sleep 5; done
cat $cs/card.txt $cs/summary.txt 2>/dev/null
for f in $cs/logs/*.log; do echo "== $f"; grep -v "━" "$f" | tail -3 | cut -c1-400; done
tar czf $OUT/cs.tgz --exclude='*.pt' -C /tmp cs
