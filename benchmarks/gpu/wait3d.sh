#!/usr/bin/env bash
# The 3D fine-tuning's data wait before and after the pinned batches of the memory loader (device tool, carry
# [".whl"]; issue 18's mini-protocol settings: phantom MM-WHS with 20 cases, paper preset, SwinUNETR feature size 24,
# crops 96^3, bf16). CONC scratch fine-tunings (seeds 0..CONC-1) run at once, STEPS steps each, evaluated once at
# the end: first with the tree as it was (the prefetched batches in pageable memory: their upload waits for the GPU
# to finish the previous step), then with this tree (sslbench/data/prefetch.py pinned). Prints each run's recorded
# data_wait and its steps/s over the training loop (log.txt: first logged step to the last).
#   CONC=1 STEPS=200 bash benchmarks/gpu/wait3d.sh        (then CONC=6 for the shared-GPU case)
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
steps=${STEPS:-200}; conc=${CONC:-1}
w=/tmp/w3d; mkdir -p $w; rm -rf /tmp/before3d; cp -r "$PWD" /tmp/before3d
python3 - /tmp/before3d <<'PY'
import pathlib, sys
p = pathlib.Path(sys.argv[1]) / "sslbench" / "tasks" / "segmentation.py"
s = p.read_text()
old = "                make = pinned(make)\n"
assert s.count(old) == 1, "segmentation.py no longer pins where this script expects"
p.write_text(s.replace(old, "                pass   # as before the pinned batches\n"))
PY
export SSLBENCH_DATA=/tmp/sbdata
sets="--set task.data.phantom_cases=20 --set task.data.val_last=10 --set model.feature_size=24
  --set task.finetune.labeled_cases=2 --set task.finetune.max_steps=$steps --set task.finetune.val_every=0
  --set task.finetune.checkpoint_every=$steps --set task.finetune.log_every=25"
PYTHONPATH=/tmp/site:$PWD python3 -m sslbench data cache --task phantom-mmwhs --preset paper \
  --set task.data.phantom_cases=20 --set task.data.val_last=10 > $w/cache.log 2>&1
for tree in before after; do
  src=$PWD; [ $tree = before ] && src=/tmp/before3d
  for s in $(seq 0 $((conc - 1))); do
    ( cd $src && PYTHONPATH=/tmp/site:$src OMP_NUM_THREADS=2 python3 -m sslbench finetune --method scratch \
        --task phantom-mmwhs --preset paper --seed $s --out $w/$tree-c$conc $sets > $w/$tree-c$conc-s$s.log 2>&1
      echo "$tree conc $conc seed $s rc=$?" ) &
  done
  wait
done
python3 - $w $conc <<'PY'
import datetime as dt, json, pathlib, re, sys
w, conc = pathlib.Path(sys.argv[1]), sys.argv[2]
for tree in ("before", "after"):
    for p in sorted((w / f"{tree}-c{conc}").glob("finetune/*/*/*/metrics.json")):
        m = json.loads(p.read_text())
        lines = re.findall(r"^(\S+ \S+) step (\d+)/\d+ ", (p.parent / "log.txt").read_text(), re.M)
        (t0, s0), (t1, s1) = lines[0], lines[-1]
        span = (dt.datetime.fromisoformat(t1) - dt.datetime.fromisoformat(t0)).total_seconds()
        rate = (int(s1) - int(s0)) / span if span > 0 else float("nan")
        print(f"{tree} x{conc} seed {m['seed']}: data_wait {m.get('data_wait', float('nan')):.3f}, "
              f"{rate:.2f} steps/s (steps {s0}-{s1}), mean dice {100 * m['mean_dice']:.2f}")
PY
tar czf $OUT/w3d.tgz --exclude='*.pt' --exclude=cache -C /tmp w3d
