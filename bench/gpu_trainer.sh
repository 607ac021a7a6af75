#!/bin/bash
# The real trainer on MLX's CUDA backend (an NVIDIA machine lent to a session, no network):
# `python -m mlx_edgelora.train`, 3 steps each, on a 1-block random INT4 Llama-3.2-3B-shape
# folder; prints each run's plan, per-step peaks (metrics.jsonl) and max RSS.
# Results and how they were run: bench/results/gpu_trainer.md.
#
# What travels in .dev/ (git-ignored through .git/info/exclude): the wheels mlx==0.32.4
# (cp312), mlx_lm, gguf, and mlx-cuda-13==0.32.4 as an xz'd tar of its unpacked wheel, split
# in two parts under the 64 MiB a call may carry (part .aa copied to /tmp by a first call);
# tok/ (the tokenizer files of bench/.models/llama3b-L1) and data/ (12 copies of
# assets/sample_notes: 141K tokens, 2 rows of 64K).
#
#     bash bench/gpu_trainer.sh s2k s16k s64k s64kf     # DEADLINE=seconds bounds the whole
exec > >(tee -a "${OUT:-/tmp}/log.txt") 2>&1
T0=$(date +%s)
DEADLINE=${DEADLINE:-530}
PY=${PY:-python3}
if [ -z "$LOCAL" ] && [ ! -e /tmp/site/mlx/lib/libmlx.so ]; then
  mkdir -p /tmp/site
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .dev/*.whl || exit 3
  cat /tmp/mlxcuda.part.aa .dev/mlxcuda.part.ab | xz -dc | tar -C /tmp/site -xf - || exit 4
fi
SP=$($PY -c "import site; print(site.getsitepackages()[0])")
export LD_LIBRARY_PATH=$(ls -d "$SP"/nvidia/*/lib 2>/dev/null | tr '\n' ':')${LD_LIBRARY_PATH:-}
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
$PY -c "import mlx.core as mx; print(mx.__version__, mx.default_device())" || exit 5
$PY bench/gpu_models.py .dev/tok /tmp/models llama3b:1 || exit 6
run() {  # name timeout args...
  name=$1; t=$2; shift 2
  left=$(( DEADLINE - ($(date +%s) - T0) ))
  [ $left -lt 30 ] && { echo "SKIP $name (time)"; return; }
  [ $t -gt $left ] && t=$left
  echo "=== RUN $name (timeout ${t}s): $*"
  s=$(date +%s)
  timeout $t /usr/bin/time -f "maxrss_kb %M" $PY -m mlx_edgelora.train --model /tmp/models/llama3b-L1 \
    --data .dev/data --out /tmp/runs/$name --overwrite --eval-every 0 --eval-batches 1 --save-every 0 \
    --val-fraction 0 "$@"
  echo "=== END $name rc=$? wall $(( $(date +%s) - s ))s"
  [ -f /tmp/runs/$name/metrics.jsonl ] && sed "s/^/METRICS $name /" /tmp/runs/$name/metrics.jsonl
}
for r in "$@"; do
  case $r in
    t256)  run t256 300 --steps 1 --max-seq-len 256 ;;  # a smoke test, also on a CPU (LOCAL=1)
    s2k)   run s2k 90 --steps 3 --max-seq-len 2048 ;;
    s16k)  run s16k 150 --steps 3 --max-seq-len 16384 ;;
    s64k)  run s64k 240 --steps 3 --max-seq-len 65536 ;;
    s64kf) run s64kf 240 --steps 3 --max-seq-len 65536 --dtype float32 ;;
  esac
done
echo "total $(( $(date +%s) - T0 ))s"
