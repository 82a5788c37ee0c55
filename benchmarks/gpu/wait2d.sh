#!/usr/bin/env bash
# The 2D track's data wait before and after the asynchronous index upload (device tool, carry [".whl"]): each
# method pre-trains ALONE on the GPU (phantom ChestX-ray14, paper preset, batch 64, 224 px, STEPS steps), then a
# scratch fine-tuning, first with the tree as it was (the batch's row indices uploaded from pageable memory, which
# waits for the GPU to finish the previous step), then with this tree (pinned, non-blocking). Prints data_wait
# and the protocol's images/s beside `sslbench bench pretrain2d`'s figure for the same method.
#   STEPS=300 METHODS="mg voco c2l" bash benchmarks/gpu/wait2d.sh
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
steps=${STEPS:-300}
w=/tmp/w2d; mkdir -p $w; rm -rf /tmp/before; cp -r "$PWD" /tmp/before
python3 - /tmp/before <<'PY'
import pathlib, sys
root = pathlib.Path(sys.argv[1]) / "sslbench"
p = root / "protocol" / "pretraining.py"
s = p.read_text()
new = s.split("    index = torch.as_tensor(picks, dtype=torch.long)\n", 1)
assert len(new) == 2
tail = new[1].split("    out = stack.index_select(0, index)\n", 1)[1]
p.write_text(new[0] + "    out = stack.index_select(0, torch.as_tensor(picks, device=stack.device))\n" + tail)
p = root / "tasks" / "classification.py"
s = p.read_text()
a = s.index("            idx = torch.as_tensor(picks, dtype=torch.long)\n")
b = s.index("            gen = torch.Generator()", a)
s = s[:a] + "            idx = torch.as_tensor(picks, device=self.train_x.device)\n" + s[b:]
a = s.index("            if device.type == \"cuda\":   # the same values, uploaded without waiting")
b = s.index("            x = self.train_x.index_select", a)
p.write_text(s[:a] + s[b:])
PY
PYTHONPATH=/tmp/site:$PWD python3 -m sslbench data synth --like chestxray14 --out $w/cx --cases 1500 > /dev/null
for tree in before after; do
  src=$PWD; [ $tree = before ] && src=/tmp/before
  for m in ${METHODS:-mg voco c2l}; do
    ( cd $src && PYTHONPATH=/tmp/site:$src python3 -m sslbench pretrain --method $m --corpus phantom-chestxray14 \
        --root $w/cx --preset paper --out $w/$tree --no-feasibility-check --set method.pretrain.steps=$steps \
        --set method.pretrain.batch_size=64 --set method.pretrain.log_every=50 > $w/$tree-$m.log 2>&1 )
    echo "$tree $m rc=$?"
  done
  ( cd $src && PYTHONPATH=/tmp/site:$src python3 -m sslbench finetune --method scratch --task phantom-chestxray14 \
      --root $w/cx --preset paper --out $w/$tree --no-feasibility-check --set task.finetune.max_steps=$steps \
      --set task.finetune.val_every=$steps --set task.finetune.log_every=50 > $w/$tree-ft.log 2>&1 )
  echo "$tree finetune rc=$?"
done
python3 - $w <<'PY'
import json, pathlib, re, sys
w = pathlib.Path(sys.argv[1])
for tree in ("before", "after"):
    for p in sorted((w / tree).glob("pretrain/*/*/*/metrics.json")):
        m = json.loads(p.read_text())
        print(f"{tree} pretrain {m['method']}: {m['steps']} steps of 64 in {m['seconds_this_session']:.1f} s, "
              f"{m['steps'] * 64 / m['seconds_this_session']:.0f} images/s, data_wait {m['data_wait']:.3f}")
    for p in sorted((w / tree).glob("finetune/*/*/*/log.txt")):
        waits = re.findall(r"data_wait ([0-9.]+)", p.read_text())
        print(f"{tree} finetune scratch: data_wait per 50 steps {' '.join(waits)}")
PY
PYTHONPATH=/tmp/site:$PWD python3 -m sslbench bench pretrain2d --method ${METHODS:-mg voco c2l} --steps 30 --warmup 5 2>/dev/null
tar czf $OUT/w2d.tgz --exclude='*.pt' --exclude=cx -C /tmp w2d
