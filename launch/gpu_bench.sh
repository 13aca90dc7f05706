#!/usr/bin/env bash
# GPU benchmark for one H100/H200 (or any CUDA GPU) with the machine's preinstalled JAX; ≤ 8 minutes.
#   OUT=gpu-bench bash launch/gpu_bench.sh
# Value+grad GTF-DEER vs BPTT (sequential lax.scan) at T = 1e5 and 1e6 for M = 3 (L = 50) and M = 16
# (L = 64), the associative scan's achieved memory bandwidth, and the card's name; raw JSON in $OUT.
# Needs only jax, numpy (no ray): `import distdeer` never imports ray.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-bench}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1 || true
python -c "import jax; print(jax.__version__, jax.devices())" > "$OUT/jax.txt" 2>&1
for cfg in "3 50" "16 64"; do
  set -- $cfg
  for T in 100000 1000000; do
    repeats=3; [ "$T" = 1000000 ] && repeats=1
    timeout 170 python -m distdeer.cli bench solver --T "$T" --latent "$1" --hidden "$2" --repeats "$repeats" \
      --json "$OUT/solver-T$T-M$1.json" > "$OUT/solver-T$T-M$1.txt" 2>&1 || echo "T=$T M=$1: failed or timed out" >> "$OUT/errors.txt"
  done
done
timeout 60 python -c "
import json
from distdeer.bench.scaling import scan_bandwidth
rows = [scan_bandwidth(T, M) for T in (2**20, 2**23) for M in (3, 16)]
print(json.dumps(rows, indent=1))
" > "$OUT/bandwidth.json" 2>&1 || echo "bandwidth: failed" >> "$OUT/errors.txt"
python - "$OUT" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
for path in sorted(glob.glob(os.path.join(out, "solver-*.json"))):
    r = json.load(open(path))
    print(f"T={r['T']:>8} M={r['latent']:>2}: DEER v+g {r['deer_value_grad_s']*1e3:9.1f} ms  BPTT v+g "
          f"{r.get('bptt_value_grad_s', float('nan'))*1e3:9.1f} ms  speed-up {1/r.get('ratio_value_grad', float('nan')):7.1f}x  "
          f"warm {1/r.get('ratio_value_grad_warm', float('nan')):7.1f}x  iterations {r['newton_iterations']}")
PY
