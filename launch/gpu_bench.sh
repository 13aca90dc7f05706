#!/usr/bin/env bash
# GPU benchmark for one H100/H200 (or any CUDA GPU) with the machine's preinstalled JAX; ends within
# BUDGET_S seconds (default 480 = 8 min) whatever happens: each step gets a time limit, a step that runs
# out is recorded in errors.txt and the next one starts.
#   OUT=gpu-bench bash launch/gpu_bench.sh     # summary: python -m distdeer.bench.gpu_summary gpu-bench
#   ONLY="solver-T.*-M3" OUT=... bash launch/gpu_bench.sh   # a subset of the steps (bash regex on their names)
#   SCALE=100 OUT=... bash launch/gpu_bench.sh              # every T divided by 100: a dry run on a CPU
# Steps, most important first: value+grad GTF-DEER vs BPTT (sequential lax.scan) at T = 1e5 and 1e6 for
# M = 3 (L = 50), then M = 16 (L = 64); the associative scan's achieved memory bandwidth; one-GPU scaling
# rows (per-iteration time and its breakdown at T = 2^17, 2^20, 2^22: the cost model's GPU constants).
# Measured on an H200 (2026-11-30): each T = 1e6 step needs ~2 min, most of it compiling BPTT (46 s) and
# running it (~25 s); the rows come last and are the first to be cut by the budget.
# Raw JSON and logs in $OUT.  Needs only jax, numpy (no ray): `import distdeer` never imports ray.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-bench}
BUDGET_S=${BUDGET_S:-480}
SCALE=${SCALE:-1}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
start=$SECONDS

# run_step NAME CAP_S COMMAND...: run with the smaller of CAP_S and the time left; log to $OUT/NAME.txt.
run_step() {
  local name=$1 cap=$2; shift 2
  [[ -n "${ONLY:-}" && ! "$name" =~ $ONLY ]] && return 0
  local left=$((BUDGET_S - (SECONDS - start)))
  local limit=$((cap < left ? cap : left))
  if [ "$limit" -lt 10 ]; then echo "$name: skipped (budget spent)" | tee -a "$OUT/errors.txt"; return 1; fi
  echo "== $name (limit ${limit}s, at $((SECONDS - start))s)"
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  [ $rc -ne 0 ] && echo "$name: exit $rc$([ $rc = 124 ] && echo ' (time limit)')" | tee -a "$OUT/errors.txt"
  tail -n 20 "$OUT/$name.txt"
  return $rc
}

solver() {  # solver NAME T M L REPEATS CAP
  run_step "$1" "$6" python -m distdeer.cli bench solver --T $(($2 / SCALE)) --latent "$3" --hidden "$4" \
    --repeats "$5" --json "$OUT/$1.json"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
  python -c "import jax; print('jax', jax.__version__, jax.devices())"; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
# The first step doubles as the smoke test: if the solver does not run on this JAX, stop at once.
solver solver-T100000-M3 100000 3 50 3 120 || { echo "first step failed: stopping"; exit 1; }
solver solver-T1000000-M3 1000000 3 50 1 200
solver solver-T100000-M16 100000 16 64 3 120
solver solver-T1000000-M16 1000000 16 64 1 200
run_step bandwidth 90 python -c "
import json
from distdeer.bench.scaling import scan_bandwidth
rows = [scan_bandwidth(T, M) for T in (2**20 // $SCALE, 2**23 // $SCALE) for M in (3, 16)]
json.dump(rows, open('$OUT/bandwidth.json', 'w'), indent=1)
for r in rows: print(r)
"
for T in 131072 1048576 4194304; do
  run_step "row-T$T-M3" 60 python -m distdeer.bench.scaling --T $((T / SCALE)) --latent 3 --hidden 50 --no-baseline \
    --out "$OUT/row-T$T-M3.json"
done
python -m distdeer.bench.gpu_summary "$OUT" | tee "$OUT/summary.txt"
echo "total $((SECONDS - start)) s"
