#!/usr/bin/env bash
# Prepare, on this machine, what benchmarks/device_run.sh installs on the GPU machine:
# wheels for Python 3.12 / manylinux x86-64 of what that machine lacks (optuna and its needs;
# tokamax and the needs of `import tokamax` that it lacks), into the git-ignored .device/wheels.
# What the GPU machine already has (jax 0.11.2, flax, optax, absl-py, jaxtyping, protobuf,
# markupsafe, ...) is not carried: /work/.library/device/KINDS.md lists it.
#
#   bash benchmarks/device_kit.sh            # then carry .device on the device run
#   NO_TOKAMAX=1 bash benchmarks/device_kit.sh   # optuna only (xprof alone is 32 MB)
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.device/wheels
mkdir -p "$dest"
rm -f "$dest"/*.whl
wheels=(optuna==5.1.0 alembic==1.20.1 sqlalchemy==2.1.9 colorlog==6.12.0 mako==1.4.3)
if [ -z "${NO_TOKAMAX:-}" ]; then
  # tokamax 0.0.17 needs jax >= 0.11.1 (the GPU machine has 0.11.2); its import reaches
  # pydantic, qwix (flax is there), xprof.cli (fire, termcolor), tensorboardX, einshape.
  wheels+=(tokamax==0.0.17 einshape==1.0 pydantic==2.14.4 pydantic-core==2.50.5
    annotated-types==0.8.0 typing-inspection==0.4.5 qwix==0.1.8 immutabledict==4.3.1
    tensorboardx==2.6.5 xprof==2.24.2 fire==0.7.1 termcolor==3.3.0)
fi
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d "$dest" "${wheels[@]}"
size_kib=$(du -sk .device | cut -f1)
echo "$(ls "$dest" | wc -l) wheels, .device is $((size_kib / 1024)) MiB (the carry limit is 64 MiB with the tree)"
if [ "$size_kib" -gt $((56 * 1024)) ]; then
  echo "too large to carry with the working tree: try NO_TOKAMAX=1" >&2
  exit 1
fi
