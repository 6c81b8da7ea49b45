#!/usr/bin/env bash
# The GPU checks of the project in one prepared script, for a session that is lent a CUDA machine (README of
# the device tool: the machine gets a copy of the working tree and has no internet; its Python has torch,
# transformers, lightning, peft and torchmetrics; the SmolLM2 GGUF file (98 MB) is over the 64 MiB a call may
# carry, so the benchmarks fall back to a random-weight Llama of SmolLM2's shape, which they say in their output:
# throughput does not depend on the weights' values).
#
#   bash benchmarks/gpu_session.sh a     # GPU tests + training throughput table       (about 6-7 min)
#   bash benchmarks/gpu_session.sh b     # statistics pass vs forward + tracker overhead (about 3-4 min)
#   bash benchmarks/gpu_session.sh all   # both (over the 10 minutes one device command may run)
#
# Writes to $OUT (the device tool's output folder; default runs/gpu_session): log_<part>.txt (everything),
# train.json, tracker.json, and gpu_table_<part>.md (the tables for docs/results.md). Each step has its own
# timeout, so one that hangs cannot eat the lease; a failing step is recorded and the next one runs.
# Without CUDA it says so and exits 0.
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:-all}
OUT=${OUT:-runs/gpu_session}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg
PY=${PYTHON:-python3}
log="$OUT/log_$part.txt"
table="$OUT/gpu_table_$part.md"

if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_session.sh: skipped, no CUDA device (torch.cuda.is_available() is False)"
    exit 0
fi

step() {  # step SECONDS NAME COMMAND...: run with a timeout, log it, record its exit status in the table
    local limit=$1 name=$2
    shift 2
    local t0=$SECONDS
    echo "### $name: $*" | tee -a "$log"
    timeout "$limit" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    echo "### $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$log"
    echo "- $name: exit $rc, $((SECONDS - t0)) s (\`$*\`)" >>"$table.steps"
}

$PY -c "import torch, transformers, lightning, peft; print('torch', torch.__version__, '| transformers', transformers.__version__, '| lightning', lightning.__version__, '| peft', peft.__version__, '|', torch.cuda.get_device_name())" | tee -a "$log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee -a "$log"

if [[ $part == a || $part == all ]]; then
    step 150 "GPU tests" $PY -m pytest -q -p no:cacheprovider -m gpu \
        tests/test_train_gpu.py tests/test_tracking_gpu.py tests/test_heads_stats.py
    step 330 "training throughput" $PY benchmarks/bench_gpu_train.py --lengths 2048 8192 16384 \
        --steps 8 --warmup 2 --json "$OUT/train.json"
fi
if [[ $part == b || $part == all ]]; then
    step 120 "statistics pass vs forward" $PY benchmarks/bench_analysis.py --lengths 2048 8192 32768 \
        --rows 64 --repeats 3 --device cuda --memory-lengths 2048 8192 32768
    step 150 "tracker overhead" $PY benchmarks/bench_gpu_train.py --what tracker --tracker-length 16384 \
        --tracker-steps 40 --tracker-every 20 --json "$OUT/tracker.json"
fi

{
    echo "## GPU session ($(date -u +%Y-%m-%dT%H:%MZ), part $part)"
    echo
    grep -m1 '^torch ' "$log"
    echo
    cat "$table.steps" 2>/dev/null
    echo
    # the training table and the statistics-pass lines, as the benchmarks printed them
    sed -n '/^| L | checkpointing/,/^###/p' "$log" | grep -v '^###'
    grep -E '^(random-weight|SmolLM2|bf16|tiny).*TFLOP/s' "$log"
    sed -n '/^### statistics pass vs forward: /,/^### statistics pass vs forward: exit/p' "$log" | grep -v '^###'
    grep '^tracker overhead' "$log"
} >"$table"
rm -f "$table.steps"
echo "table: $table"
