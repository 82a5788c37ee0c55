#!/usr/bin/env bash
# Compiled teacher-student VoCo on one GPU (issue 3's throughput target), one device call (< 10 min) per stage:
#   bash benchmarks/voco_ts_compiled.sh OUT check       # the timed compiled step with the defaults, then (same
#                                                       # machine, warm compile cache) with dQ, delta and the bias
#                                                       # gradient by their other forms, then the attention
#                                                       # kernels' backward forms side by side
#   bash benchmarks/voco_ts_compiled.sh OUT agreement   # each compiled backbone piece against eager, under
#                                                       # sslbench's Inductor settings and with padding back on
#   bash benchmarks/voco_ts_compiled.sh OUT cudagraphs [BENCH FLAGS...]   # the timed step with CUDA graphs
# Every bench row says whether it is a valid measurement (finite losses; on the probe step the compiled loss within
# 5 % of eager's and the backbone features as close to fp32 as eager bf16's). Each command gets what is left of BUDGET seconds (default 560) and is skipped
# when under a minute is left. Installs the .whl wheels (device-wheels.sh) when MONAI is missing.
set -uo pipefail
out=$1; what=${2:-check}; shift 2 || shift $#
case $what in check|agreement|cudagraphs) ;; *) echo "usage: $0 OUT check|agreement|cudagraphs [BENCH FLAGS...]" >&2; exit 2 ;; esac
mkdir -p "$out"
if ! python3 -c "import monai" 2>/dev/null && ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
start=$SECONDS
left() { echo $(( ${BUDGET:-560} - (SECONDS - start) )); }
step() {   # step NAME COMMAND...: run with what is left of the budget, output in OUT/NAME.log
  local name=$1; shift
  local t; t=$(left)
  if [ "$t" -lt 60 ]; then echo "skipped $name: $t s left"; return; fi
  timeout "$t" "$@" > "$out/$name.log" 2>&1 || echo "$name: exit $?"
  grep -v -e Warning -e warn "$out/$name.log" | tail -${TAIL:-5}
}
bench=(python3 -m sslbench bench pretrain --method voco --variant teacher-student --compile --steps 10 --warmup 3)
case $what in
  check)
    step ts-compiled "${bench[@]}" --json "$out/ts-compiled.json"
    step ts-compiled-optional-forms "${bench[@]}" --dq-mode atomic --delta-mode torch --dbias-mode atomic \
      --json "$out/ts-compiled-optional-forms.json"
    TAIL=25 step kernels python3 benchmarks/window_attention_kernels.py --json "$out/kernels.json" ;;
  agreement)
    BUDGET=$(( ${BUDGET:-560} / 2 )) TAIL=25 step agreement python3 benchmarks/compile_agreement.py --json "$out/agreement.json"
    TAIL=25 step agreement-padding-on python3 benchmarks/compile_agreement.py --inductor comprehensive_padding=true \
      --json "$out/agreement-padding-on.json" ;;
  cudagraphs)
    step ts-compiled-cudagraphs "${bench[@]}" --compile-mode reduce-overhead "$@" --json "$out/ts-compiled-cudagraphs.json" ;;
esac
