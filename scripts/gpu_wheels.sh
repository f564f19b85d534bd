#!/usr/bin/env bash
# `make gpu-wheels`: saves into FOLDER, on this machine (it needs the package registry), the wheels that
# `make gpu-check` installs offline on a GPU machine: requirements/gpu-check.txt at constraints.txt's versions, for
# that machine's Python (GPU_PYTHON_VERSION, default 3.12, x86-64 Linux), and detectron2 by its registry route.
# Packages published as source only (fvcore, iopath, antlr4-python3-runtime) are pure Python: their wheels are
# built here and serve any Python 3.
set -euo pipefail
PY=${1:?usage: gpu_wheels.sh <python with pip> <folder>}
DIR=${2:?usage: gpu_wheels.sh <python with pip> <folder>}
PYTHON_VERSION=${GPU_PYTHON_VERSION:-3.12}
cd "$(dirname "$0")/.."
CONSTRAINTS=requirements/constraints.txt
TARGET=(--only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)

mkdir -p "$DIR"
rm -f "$DIR"/*.whl
for req in $(grep -v '^#' requirements/gpu-check.txt); do
    if ! "$PY" -m pip download -q --no-deps "${TARGET[@]}" -c "$CONSTRAINTS" -d "$DIR" "$req" 2>/dev/null; then
        echo "$req: no wheel for Python $PYTHON_VERSION on the registry, building one from its source"
        "$PY" -m pip wheel -q --no-deps -c "$CONSTRAINTS" -w "$DIR" "$req"
    fi
done
bash scripts/install_detectron2.sh "$PY" --download "$DIR"

# A wheel built here from a source with compiled parts would be for this machine's Python only.
if ls "$DIR"/*.whl | grep -v -e '-none-any\.whl$' -e "-cp${PYTHON_VERSION/./}-.*manylinux.*\.whl$"; then
    echo "error: the wheels above do not install on Python $PYTHON_VERSION x86-64 Linux" >&2
    exit 1
fi
ls -l "$DIR"
du -sh "$DIR"
