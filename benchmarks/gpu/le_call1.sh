set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD SSLBENCH_DATA=/tmp/sbdata
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, monai; print(torch.__version__, monai.__version__)"
export TASKS=phantom-mmwhs LABELS=2 SEEDS="0 1 2" PRETRAIN_STEPS=500 PRETRAIN_BATCH=2 FINETUNE_STEPS=400 \
  EXTRA="--set model.feature_size=24" TASK_SETS="data.phantom_cases=20 data.val_last=10"
start=$(date +%s)
( nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader -l 20 > $OUT/smi.txt ) &
JOBS=10 PHASE=pretrain timeout 330 bash benchmarks/label_efficiency.sh /tmp/le
echo "pretrain phase $(( $(date +%s) - start )) s"
METHODS="scratch supervised supervised-task" JOBS=9 PHASE=finetune timeout $(( 560 - ($(date +%s) - start) )) bash benchmarks/label_efficiency.sh /tmp/le
echo "total $(( $(date +%s) - start )) s"
cat /tmp/le/summary.txt
tar czf $OUT/le.tgz --exclude='*.pt' -C /tmp le
