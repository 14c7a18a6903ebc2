#!/usr/bin/env bash
# Builds and installs inplace-abn 1.1.0 (TResNet's activated batch norm) from source into the
# Python given as $1. Never fails setup: when the build is impossible it prints one warning and
# the project runs on its pure-PyTorch ABN, which computes the same function.
set -u
PY=${1:-.venv/bin/python}
VERSION=1.1.0

if "$PY" -c "import inplace_abn" 2>/dev/null; then
    echo "inplace-abn: already installed"
    exit 0
fi

warn() {
    echo "WARNING: inplace-abn could not be built ($1); the project will use its pure-PyTorch ABN" \
         "(same results, more memory). See tools/build_inplace_abn.sh." >&2
    exit 0
}

# The nvcc on PATH may be a wrapper script that execs the real compiler; torch would guess
# CUDA_HOME from the wrapper's folder and linking would fail (-lcudart not found). Follow
# symlinks and wrappers to the real binary and take its toolkit folder.
cuda_home_from_nvcc() {
    local nvcc target
    nvcc=$(command -v nvcc) || return 1
    nvcc=$(readlink -f "$nvcc")
    if [ "$(head -c 2 "$nvcc")" = "#!" ]; then
        target=$(grep -oE '/[^"'"'"' ]*/bin/nvcc' "$nvcc" | head -n 1)
        [ -n "$target" ] && nvcc=$(readlink -f "$target")
    fi
    [ -x "$nvcc" ] || return 1
    dirname "$(dirname "$nvcc")"
}

torch_cuda=$("$PY" -c "import torch; print(torch.version.cuda or '')" 2>/dev/null) \
    || warn "torch is not importable by $PY"

if [ -n "$torch_cuda" ]; then
    if [ -z "${CUDA_HOME:-}" ]; then
        CUDA_HOME=$(cuda_home_from_nvcc) || warn "torch is a CUDA $torch_cuda build but no nvcc was found; set CUDA_HOME"
    fi
    [ -d "$CUDA_HOME" ] || warn "CUDA_HOME=$CUDA_HOME is not a folder"
    export CUDA_HOME
    if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
        # The visible GPUs' architectures. Where none is visible (a build machine), Hopper's,
        # with its PTX so that newer GPUs compile it at first use; an older GPU (an A100 is
        # 8.0) needs a rebuild where it is visible, which the training run says at start.
        TORCH_CUDA_ARCH_LIST=$("$PY" -c "
import torch
caps = sorted({'%d.%d' % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
print(';'.join(caps) or '9.0+PTX')" 2>/dev/null) || TORCH_CUDA_ARCH_LIST=9.0+PTX
    fi
    export TORCH_CUDA_ARCH_LIST
    echo "inplace-abn: building for CUDA $torch_cuda with CUDA_HOME=$CUDA_HOME, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST (about a minute on 2 cores)"
else
    echo "inplace-abn: building the CPU version"
fi

# The source package reports version 0.0.0 without this; its setup.py imports torch, hence no
# build isolation (and its build tools must be present beforehand).
export SETUPTOOLS_SCM_PRETEND_VERSION=$VERSION
export MAX_JOBS=${MAX_JOBS:-$(nproc 2>/dev/null || echo 2)}
log=$(mktemp)
if ! "$PY" -m pip install -q setuptools_scm wheel >"$log" 2>&1 \
   || ! "$PY" -m pip install --no-build-isolation --no-deps "inplace-abn==$VERSION" >>"$log" 2>&1; then
    tail -n 15 "$log" >&2
    rm -f "$log"
    warn "pip install failed; the last lines of its output are above"
fi
rm -f "$log"
"$PY" -c "import inplace_abn" 2>/dev/null || {
    "$PY" -m pip uninstall -q -y inplace-abn >/dev/null 2>&1
    warn "it installed but does not import"
}
echo "inplace-abn: installed"
