#!/usr/bin/env bash
# The one GPU run: from the repo root on the device machine, with .device carried (made by
# benchmarks/device_kit.sh). Installs the carried wheels into a temporary target on
# PYTHONPATH, prints the environment, runs benchmarks/gpu_attention.py (its own budget keeps
# it under 5 minutes), then the Pallas tests on the GPU with the time left. Everything lands
# in $OUT (at most 6 files), written as it goes, so a run cut short keeps what it did.
#
#   bash benchmarks/device_run.sh                        # on the GPU machine, OUT set
#   TOTAL_S=300 BENCH_ARGS=--quick bash benchmarks/device_run.sh
#   BENCH_ARGS=--cpu-smoke bash benchmarks/device_run.sh # here, to try the script
set -u
cd "$(dirname "$0")/.."
start=$(date +%s)
total=${TOTAL_S:-540}  # one device command may run 600 s
OUT=${OUT:-.device/out}
mkdir -p "$OUT"
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

{
  if compgen -G ".device/wheels/*.whl" >/dev/null; then
    site=$(mktemp -d)
    if "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --target "$site" .device/wheels/*.whl; then
      export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    else
      echo "installing the carried wheels failed: running without them"
    fi
  else
    echo "no .device/wheels: run benchmarks/device_kit.sh here and carry .device"
  fi
  "$py" - <<'PY'
import importlib, platform
import jax
print("python", platform.python_version(), "jax", jax.__version__, "backend", jax.default_backend())
print("devices", jax.devices())
for name in ("optuna", "tokamax", "triton"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as exc:  # what is missing is reported, the run goes on
        print(name, "unavailable:", type(exc).__name__, str(exc).splitlines()[0][:200])
PY
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
} >"$OUT/env.txt" 2>&1  # not a pipeline: the export above must stay in this shell
cat "$OUT/env.txt"

left=$((total - ($(date +%s) - start)))
bench=$((left < 300 ? left : 300))
# shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
timeout -k 5 "$bench" "$py" -m benchmarks.gpu_attention --budget $((bench - 30)) \
  --out "$OUT/gpu_attention" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/gpu_attention.log"

left=$((total - ($(date +%s) - start)))
tests=$(compgen -G "tests/test_pallas*.py" | tr '\n' ' ')
if [ -z "$tests" ]; then
  echo "no tests/test_pallas*.py in this tree" | tee "$OUT/pytest_pallas.log"
elif [ "$left" -lt 30 ]; then
  echo "no time left for the Pallas tests ($left s)" | tee "$OUT/pytest_pallas.log"
else
  # shellcheck disable=SC2086
  timeout -k 5 "$((left - 5))" "$py" -m pytest -o addopts="" -q -x -p no:cacheprovider \
    $tests 2>&1 | tee "$OUT/pytest_pallas.log"
fi
echo "done in $(($(date +%s) - start)) s; results in $OUT"
