#!/usr/bin/env bash
# One device call: warm the kernel cache in parallel, run the GPU tests, the main job and the
# quick benchmark. Logs land in $OUT (the device tool brings them back).
#   CUFLASH_COMMIT=$(git rev-parse HEAD) bash benchmarks/gpu_check.sh [pytest -k expression] [bench args...]
# (the device copy's .git, if any, is stale: bench.py records CUFLASH_COMMIT when it is set).
# BENCH_TIMEOUT (seconds, default 240) stops the benchmark with SIGINT, which still saves the
# points measured so far (the JSON says "interrupted"); SUITE_TIMEOUT (480) and NPROC (15) the tests.
set -uo pipefail
OUT=${OUT:-/tmp/cuflash-out}
mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1
kexpr=${1:-}
shift || true
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
start=$(date +%s)
python -m cuflash warmup --all --jobs 16 > "$OUT/warmup.log" 2>&1; echo "warmup rc=$? in $(( $(date +%s) - start )) s"; tail -3 "$OUT/warmup.log"
start=$(date +%s)
# -n 15 on the 16-core H200 host: the whole suite in about 7 minutes (SUITE_TIMEOUT stops it in time
# to keep the log; -rfE lists failures at the end).
timeout -s INT "${SUITE_TIMEOUT:-480}" python -m pytest tests -q -rfE -m gpu -n "${NPROC:-15}" -p no:cacheprovider \
    ${kexpr:+-k "$kexpr"} > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests rc=$? in $(( $(date +%s) - start )) s"
grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests.log" | head -40
tail -2 "$OUT/gpu_tests.log"
python -m cuflash > "$OUT/main.log" 2>&1; echo "main rc=$?"; cat "$OUT/main.log"
if [ "$#" -gt 0 ]; then
  timeout -s INT "${BENCH_TIMEOUT:-240}" python benchmarks/bench.py --out-dir "$OUT" --no-plot "$@" > "$OUT/bench.log" 2>&1
  echo "bench rc=$?"
  tail -60 "$OUT/bench.log"
fi
