#!/usr/bin/env bash
# Compiled teacher-student VoCo on one GPU (issue 3's throughput target), in device calls of < 10 minutes:
#   bash benchmarks/voco_ts_compiled.sh OUT check     # compiled pieces + 4 lockstep steps against eager, then
#                                                     # the timed compiled step (the defaults)
#   bash benchmarks/voco_ts_compiled.sh OUT variants  # the attention kernels' backward forms side by side, the
#                                                     # timed step with dQ and the bias gradient by atomics and
#                                                     # delta by its kernel
#   bash benchmarks/voco_ts_compiled.sh OUT padding   # the timed step with CUDA graphs, and the agreement with
#                                                     # Inductor's comprehensive padding back on (for contrast)
# Every bench row says whether it is a valid measurement (finite losses, compiled = eager on the probe step).
set -uo pipefail
out=$1; what=${2:-check}
mkdir -p "$out"
bench=(python3 -m sslbench bench pretrain --method voco --variant teacher-student --compile --steps 10 --warmup 3)
case $what in
  check)
    timeout 280 python3 benchmarks/compile_agreement.py --steps 4 --json "$out/agreement.json" > "$out/agreement.log" 2>&1 \
      || echo "compile_agreement: exit $?"
    grep -v Warning "$out/agreement.log" | tail -25
    timeout 260 "${bench[@]}" --json "$out/ts-compiled.json" > "$out/ts-compiled.log" 2>&1 || echo "bench: exit $?"
    tail -6 "$out/ts-compiled.log" ;;
  variants)
    timeout 150 python3 benchmarks/window_attention_kernels.py --json "$out/kernels.json" > "$out/kernels.log" 2>&1 \
      || echo "kernels: exit $?"
    cat "$out/kernels.log"
    timeout 220 "${bench[@]}" --dq-mode atomic --delta-mode kernel --dbias-mode atomic \
      --json "$out/ts-compiled-atomics.json" > "$out/ts-compiled-atomics.log" 2>&1 || echo "bench atomics: exit $?"
    tail -4 "$out/ts-compiled-atomics.log" ;;
  padding)
    timeout 220 "${bench[@]}" --compile-mode reduce-overhead --json "$out/ts-compiled-cudagraphs.json" \
      > "$out/ts-compiled-cudagraphs.log" 2>&1 || echo "bench reduce-overhead: exit $?"
    tail -4 "$out/ts-compiled-cudagraphs.log"
    timeout 280 python3 benchmarks/compile_agreement.py --inductor comprehensive_padding=true --steps 4 \
      --json "$out/agreement-padding-on.json" > "$out/agreement-padding-on.log" 2>&1 || echo "agreement padding on: exit $?"
    grep -v Warning "$out/agreement-padding-on.log" | tail -25 ;;
  *) echo "usage: $0 OUT check|variants|padding" >&2; exit 2 ;;
esac
