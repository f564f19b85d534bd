#!/usr/bin/env bash
# Install detectron2 into the venv whose python is $1. Three routes, first match wins:
#   1. `import detectron2` already works in that venv: keep it (e.g. built from the official source).
#   2. DETECTRON2_PIP_SPEC is set: `pip install` exactly that (e.g. 'git+https://github.com/facebookresearch/detectron2.git'
#      or a local clone's path), built against the venv's torch.
#   3. Otherwise: the pure-Python detectron2 sources from the registry package sal-detectron2==0.7.2
#      (a repackaging of detectron2's main branch, 2024). Its only wheel is tagged cp310 and bundles a _C built
#      for Python 3.10; that _C is deleted. This project uses none of detectron2's compiled ops, and detectron2
#      imports without them.
# Offline: `install_detectron2.sh <python> --download DIR` only saves route 3's wheel into DIR (`make gpu-wheels`
# does, on a machine with network); with PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR, route 3 then installs from DIR.
set -euo pipefail
PY=${1:?usage: install_detectron2.sh <venv python> [--download DIR]}
CONSTRAINTS=${CONSTRAINTS:-requirements/constraints.txt}
SAL=(sal-detectron2==0.7.2 --no-deps --only-binary=:all: --python-version 3.10)

if [ "${2:-}" = "--download" ]; then
    "$PY" -m pip download -q -d "${3:?usage: install_detectron2.sh <python> --download DIR}" "${SAL[@]}"
    exit 0
fi

if "$PY" -c "import detectron2" 2>/dev/null; then
    echo "detectron2: keeping the installed $("$PY" -c 'import detectron2, os; print(detectron2.__version__, "at", os.path.dirname(detectron2.__file__))')"
    exit 0
fi

if [ -n "${DETECTRON2_PIP_SPEC:-}" ]; then
    echo "detectron2: installing DETECTRON2_PIP_SPEC=${DETECTRON2_PIP_SPEC}"
    "$PY" -m pip install --no-build-isolation "${DETECTRON2_PIP_SPEC}"
    exit 0
fi

SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
echo "detectron2: installing the pure-Python sources of ${SAL[0]} into $SITE"
"$PY" -m pip install -q --target "$TMP" "${SAL[@]}"
rm -f "$TMP"/detectron2/_C.cpython-*.so
# The wheel also ships a top-level `tools` package; only detectron2 itself belongs in site-packages.
rm -rf "$SITE/detectron2" "$SITE"/sal_detectron2-*.dist-info
cp -r "$TMP/detectron2" "$TMP"/sal_detectron2-*.dist-info "$SITE/"
"$PY" -c "import detectron2; print('detectron2', detectron2.__version__, 'imports (no compiled _C)')"
