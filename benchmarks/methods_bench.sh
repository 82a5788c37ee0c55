#!/usr/bin/env bash
# Pre-training throughput of every method at the shared geometry (issue 5): feature size 48, bf16, 2 corpus
# volumes per step (each method makes its own crops / views of them, at its recipe's paper params), 10 timed
# steps after 3 warm-up steps; plus each method's original backbone family where it has one.
#   bash benchmarks/methods_bench.sh OUT_DIR [METHOD ...]
set -uo pipefail
out=$1; shift
methods=("$@")
[ ${#methods[@]} -eq 0 ] && methods=(voco mg transvw simsiam pcrlv1 pcrlv2 mae swinunetr-ssl)
mkdir -p "$out"
for m in "${methods[@]}"; do
  python3 -m sslbench bench pretrain --method "$m" --batch 2 --steps 10 --warmup 3 --json "$out/$m-swinunetr.json" \
      > "$out/$m-swinunetr.log" 2>&1 || echo "FAILED $m swinunetr"
  case $m in
    mg|transvw|pcrlv1|pcrlv2|simsiam) fam=unet3d ;;
    mae) fam=unetr ;;
    *) fam= ;;
  esac
  if [ -n "$fam" ]; then
    python3 -m sslbench bench pretrain --method "$m" --model "$fam" --batch 2 --steps 10 --warmup 3 \
        --json "$out/$m-$fam.json" > "$out/$m-$fam.log" 2>&1 || echo "FAILED $m $fam"
  fi
done
python3 - "$out" <<'PY'
import glob, json, sys
rows = []
for f in sorted(glob.glob(sys.argv[1] + "/*.json")):
    rows += json.load(open(f))
cols = ["method", "model", "batch", "size", "volumes_per_s", "step_s", "tflop_per_step", "tflops", "peak_gib", "error"]
print("| " + " | ".join(cols) + " |")
print("|" + "---|" * len(cols))
for r in rows:
    print("| " + " | ".join(f"{r.get(c):.3f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols) + " |")
PY
