#!/usr/bin/env bash
# Table 4 on the phantom ChestX-ray14 twin (issue 23): every 2D method x SEEDS through `sslbench run` (2D
# pre-training on the task's 60% pretrain split, fine-tuning on the rest, mean AUC on test_list.txt), then
# the report and the pre-training throughput of each method (images/s = steps x batch / pre-training seconds).
#   bash benchmarks/table4.sh OUT_DIR
# Environment (defaults): METHODS ("scratch mg transvw c2l simsiam pcrlv1 pcrlv2 voco": Table 4's rows), SEEDS ("0 1 2"), PRESET (paper: 224 px),
# PRETRAIN_STEPS (2000), PRETRAIN_BATCH (64: the issue's throughput setting), FINETUNE_STEPS (1000), JOBS (3
# processes share the GPU), EXTRA (more --set arguments for every run). Every run is PHANTOM data.
set -uo pipefail
out=$1
methods=(${METHODS:-scratch mg transvw c2l simsiam pcrlv1 pcrlv2 voco})
seeds=(${SEEDS:-0 1 2})
preset=${PRESET:-paper}
pre=${PRETRAIN_STEPS:-2000}
batch=${PRETRAIN_BATCH:-64}
ft=${FINETUNE_STEPS:-1000}
jobs=${JOBS:-3}
extra=(${EXTRA:-})
mkdir -p "$out/logs"
python3 -m sslbench data synth --like chestxray14 --out "$out/data" --cases 1500 > "$out/logs/synth.log" 2>&1
one() {   # method seed
  local m=$1 s=$2 sets=(--set task.finetune.max_steps=$ft --set task.finetune.val_every=$ft)
  [ "$m" = scratch ] || sets+=(--set method.pretrain.steps=$pre --set method.pretrain.batch_size=$batch)
  python3 -m sslbench run --method "$m" --task phantom-chestxray14 --root "$out/data" --preset "$preset" \
    --seed "$s" --out "$out/runs" "${sets[@]}" "${extra[@]}" > "$out/logs/$m-s$s.log" 2>&1
  echo "$m seed $s: rc $?"
}
export -f one; export out pre batch ft preset
for s in "${seeds[@]}"; do for m in "${methods[@]}"; do echo "$m $s"; done; done \
  | xargs -P "$jobs" -n 2 bash -c 'one "$@"' _ | tee "$out/summary.txt"
python3 -m sslbench report --runs "$out/runs" --out "$out/report" > "$out/logs/report.log" 2>&1
python3 - "$out/runs" <<'PY' | tee -a "$out/summary.txt"
import json, pathlib, sys
import yaml
for p in sorted(pathlib.Path(sys.argv[1]).glob("pretrain/*/*/*/metrics.json")):
    m = json.loads(p.read_text())
    b = int(yaml.safe_load((p.parent / "recipe.yaml").read_text())["method"]["pretrain"]["batch_size"])
    print(f"{m['method']} seed {m['seed']}: {m['steps']} steps in {m['seconds_this_session']:.0f} s, "
          f"{m['steps'] * b / m['seconds_this_session']:.1f} images/s (batch {b}; PHANTOM)")
PY
