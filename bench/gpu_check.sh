#!/usr/bin/env bash
# SeFi-IDE GPU check on ComfyUI v0.33.0, for a lent GPU machine with PyTorch and no package registry.
#
#   bash bench/gpu_check.sh [all|install|check] [bench/gpu_check.py options...]
#
#   install  unpack ComfyUI v0.33.0 from the carried tarball (once) and install, from the carried wheel folders,
#            every start-up requirement of ComfyUI and the pack that this python lacks (bench/gpu_wheels.py install:
#            nothing already there is replaced; MISSING lines name what is still needed); then import the host.
#   check    run bench/gpu_check.py: 1000 steps at 512 px in fp16 under dynamic VRAM and under
#            --disable-dynamic-vram (one process each), then the fp16-vs-fp32 mapper gradients on CUDA.
#   all      install, then check (the default).
# Results: the summary at the end of the output, and $OUT/gpu_check.txt, gpu_check.json, install.log and one log
# per child (dynamic.log, static.log, grad.log) when $OUT is set.
#
# ---- The plan: device-tool `run` calls for the lead engineer ------------------------------------------------------
# Prepared here (needs PyPI, once): python3 bench/gpu_wheels.py download   (bench/.gpu_wheels/, git-ignored;
# bench/.gpu_wheels/MANIFEST.txt lists every wheel and its size), and the tarball copied there:
#   mkdir -p bench/.gpu_wheels/host && cp ../shared/hosts/comfyui-0.33.0-783545f6.tar.gz bench/.gpu_wheels/host/
#
# Call 1 (the whole check; the H200 image 'cuda': CPython 3.12, torch 2.11.0+cu130, torchaudio 2.11.0, scipy,
#         transformers, aiohttp... already there, per /work/.library/device/KINDS.md):
#     command: bash bench/gpu_check.sh all
#     carry:   ["bench/.gpu_wheels/h200", "bench/.gpu_wheels/host"]
#     timeout_s: 600
#   travels: h200 49.9 MiB (av 34.1, kornia-rs 5.1, sqlalchemy 4.5, pydantic-core 2.2, kornia 1.9, 14 small ones,
#   comfy-kitchen's pure-Python wheel) + tarball 7.2 MiB + the working tree (~2.3 MiB) = ~59.5 MiB of 64.
#   Takes: install ~20 s, then the children under a 480 s deadline (bench/gpu_check.py --deadline).
#   That is all, when it ends with the summary block and no MISSING line.
#
# Only if call 1 printed MISSING lines (an image other than the one KINDS.md describes) -- issue these at once,
# one after the other (the machine keeps what was installed, and the ComfyUI tree call 1 unpacked, only while warm:
# ~30 s after each call), with XX the CPython of that machine (call 1 prints "wheel folder for this python"):
# Call 2:  command: bash bench/gpu_check.sh install      carry: ["bench/.gpu_wheels/full-cp3XX-1"]   (60.0 MiB)
# Call 3:  command: bash bench/gpu_check.sh install      carry: ["bench/.gpu_wheels/full-cp3XX-2"]   (56.4-57.1 MiB)
# Call 4:  command: bash bench/gpu_check.sh check        carry: []                                  timeout_s: 600
#   (full-cp3XX-1/-2 together: everything ComfyUI v0.33.0 needs beyond torch + torchvision for that CPython, see
#   bench/.gpu_wheels/MANIFEST.txt; -1 holds av, transformers, kornia-rs, sqlalchemy, tokenizers..., -2 scipy and
#   the rest. torchaudio 2.11.1 in -2 needs torch >= 2.11: with an older torch the installer says which torchaudio
#   to carry instead. If the machine went back between calls, start again from call 1.)
#
# Optional, for comfy-kitchen's CUDA build (58.5 MB: only quantized fp8/fp4 layers and --use-ck-attention use it;
# the pure wheel in h200 serves an fp16 SD1.x run): BEFORE call 1, and call 1 at once after it,
# Call 0:  command: bash bench/gpu_check.sh install      carry: ["bench/.gpu_wheels/kitchen-cuda-cp312"] (55.8 MiB)
# -----------------------------------------------------------------------------------------------------------------
#
# Environment: PYTHON (default python3: on the H200 image the one that holds PyTorch), SEFI_GPU_DIR (default
# /tmp/sefi-gpu: ComfyUI tree, installed wheels in site/, the checkpoint), COMFYUI_PATH (skip the unpack and use
# that tree), SEFI_WHEEL_DIRS (the wheel folders to install from; default: every folder under bench/.gpu_wheels/
# but pool/ and host/, i.e. whatever was carried). Runs on a CPU as well (a dry run: pass --steps 3 --resolution 64 --preset tiny --grad-resolution 64).
set -uo pipefail
cd "$(dirname "$0")/.."
phase=all
case "${1:-}" in all|install|check) phase=$1; shift ;; esac
PY=${PYTHON:-python3}
WHEELS=bench/.gpu_wheels
BASE=${SEFI_GPU_DIR:-/tmp/sefi-gpu}
SITE=$BASE/site
HOST_TREE=${COMFYUI_PATH:-$BASE/ComfyUI-0.33.0}
mkdir -p "$BASE" "$SITE"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
log() { if [ -n "${OUT:-}" ]; then tee -a "$OUT/install.log"; else cat; fi; }

machine() {
  echo "== machine"
  "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], sys.executable); print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available()); print("gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")'
  command -v nvidia-smi >/dev/null && nvidia-smi -L
  "$PY" -c 'import sys; print("wheel folder for this python: full-cp%d%d-*" % sys.version_info[:2])'
}

install() {
  echo "== ComfyUI tree: $HOST_TREE"
  if [ ! -f "$HOST_TREE/comfyui_version.py" ]; then
    tarball=$(ls $WHEELS/host/comfyui-0.33.0-*.tar.gz 2>/dev/null | head -1)
    if [ -z "$tarball" ]; then echo "MISSING: no ComfyUI tree at $HOST_TREE and no carried $WHEELS/host/comfyui-0.33.0-*.tar.gz"; return 3; fi
    mkdir -p "$HOST_TREE" && tar -xzf "$tarball" -C "$HOST_TREE" --strip-components=1 && echo "unpacked $tarball"
  fi
  grep -o '"[0-9.]*"' "$HOST_TREE/comfyui_version.py" | head -1 | sed 's/^/ComfyUI version /'
  dirs=${SEFI_WHEEL_DIRS:-$(find $WHEELS -mindepth 1 -maxdepth 1 -type d ! -name pool ! -name host 2>/dev/null | sort)}
  echo "== wheels carried: ${dirs:-none}"
  rc=0
  if [ -n "$dirs" ]; then
    "$PY" bench/gpu_wheels.py install --target "$SITE" "$HOST_TREE" $dirs || rc=$?
  else
    "$PY" bench/gpu_wheels.py install --dry-run "$HOST_TREE" "$BASE" || rc=$?
  fi
  echo "== importing the host (main.py's start-up imports)"
  (cd "$BASE" && "$PY" - "$HOST_TREE" <<'EOF'
import sys
sys.path.insert(0, sys.argv[1])
import comfy.options
import torch
from comfy.cli_args import args
args.cpu = not torch.cuda.is_available()  # as a CPU user starts the host (--cpu); else the device pick fails
import utils.extra_config
import comfy.utils, execution, server, nodes, comfy.model_management, comfy_aimdo.control, comfy_kitchen, av
import torchaudio
print("import OK: nodes, execution, server, comfy.model_management, comfy_aimdo, comfy_kitchen, av, torchaudio",
      torchaudio.__version__)
EOF
  ) || { echo "MISSING: the host does not import (see the traceback above)"; rc=3; }
  return $rc
}

check() {
  echo "== gpu_check.py $*"
  COMFYUI_PATH="$HOST_TREE" "$PY" bench/gpu_check.py --work-dir "$BASE/work" "$@"
}

{ machine; } 2>&1 | log
status=0
if [ "$phase" != check ]; then
  install 2>&1 | log
  status=${PIPESTATUS[0]}
  if [ "$status" != 0 ]; then
    echo "install: MISSING packages (exit $status): carry the folders named above (see the plan at the top of bench/gpu_check.sh)" | log
    [ "$phase" = all ] && exit "$status"
  fi
fi
if [ "$phase" != install ]; then
  check "$@"
  status=$?
fi
exit $status
