#!/usr/bin/env bash
# Set up ComfyUI v0.33.0 for the GPU check (bench/gpu_check.py) on a GPU machine that has PyTorch but no package index.
#
#   bash .ci/gpu/install.sh
#
# Needs, beside this repository's working tree (see .ci/gpu/README.md for how to prepare them where PyPI is reachable):
#   .ci/gpu/wheels/host/comfyui-0.33.0-*.tar.gz   the host's source tarball (or set COMFYUI_PATH to a ComfyUI tree)
#   .ci/gpu/wheels/<folders>/                      the wheel folders this machine lacks (.ci/gpu/wheels.py pack)
# Installs into $SEFI_GPU_DIR/site (default /tmp/sefi-gpu/site), never over what the image has, and imports the host
# as main.py does to prove it starts. Prints MISSING lines (and exits 3) for what is still needed.
# Then: PYTHONPATH=$SEFI_GPU_DIR/site COMFYUI_PATH=$SEFI_GPU_DIR/ComfyUI-0.33.0 python3 bench/gpu_check.py
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
WHEELS=.ci/gpu/wheels
BASE=${SEFI_GPU_DIR:-/tmp/sefi-gpu}
SITE=$BASE/site
HOST_TREE=${COMFYUI_PATH:-$BASE/ComfyUI-0.33.0}
mkdir -p "$BASE" "$SITE"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONDONTWRITEBYTECODE=1

echo "== machine"
"$PY" -c 'import sys, torch; print("python", sys.version.split()[0], sys.executable); print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available()); print("gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")'
"$PY" -c 'import sys; print("wheel folder for this python: full-cp%d%d-*" % sys.version_info[:2])'

echo "== ComfyUI tree: $HOST_TREE"
if [ ! -f "$HOST_TREE/comfyui_version.py" ]; then
  tarball=$(ls $WHEELS/host/comfyui-0.33.0-*.tar.gz 2>/dev/null | head -1)
  if [ -z "$tarball" ]; then echo "MISSING: no ComfyUI tree at $HOST_TREE and no $WHEELS/host/comfyui-0.33.0-*.tar.gz"; exit 3; fi
  mkdir -p "$HOST_TREE" && tar -xzf "$tarball" -C "$HOST_TREE" --strip-components=1 && echo "unpacked $tarball"
fi
grep -o '"[0-9.]*"' "$HOST_TREE/comfyui_version.py" | head -1 | sed 's/^/ComfyUI version /'

dirs=${SEFI_WHEEL_DIRS:-$(find $WHEELS -mindepth 1 -maxdepth 1 -type d ! -name pool ! -name host 2>/dev/null | sort)}
echo "== wheels: ${dirs:-none}"
status=0
if [ -n "$dirs" ]; then
  "$PY" .ci/gpu/wheels.py install --target "$SITE" "$HOST_TREE" $dirs || status=$?
else
  "$PY" .ci/gpu/wheels.py install --dry-run "$HOST_TREE" "$BASE" || status=$?
fi

echo "== importing the host (main.py's start-up imports)"
(cd "$BASE" && "$PY" - "$HOST_TREE" <<'PYEOF'
import sys
sys.path.insert(0, sys.argv[1])
import comfy.options
import torch
from comfy.cli_args import args
args.cpu = not torch.cuda.is_available()  # as a CPU user starts the host (--cpu); else the device pick fails
import utils.extra_config
import comfy.utils, execution, server, nodes, comfy.model_management
print("import OK: nodes, execution, server, comfy.model_management")
PYEOF
) || { echo "MISSING: the host does not import (see the traceback above)"; status=3; }
exit $status
