#!/usr/bin/env bash
# experiments/device_check.py on a fresh GPU machine: install, then run inside a total time limit.
#
#   bash experiments/device_check.sh [device_check.py options]       # from the repository root or anywhere
#
# Installs this package (pip install -e .) and a CUDA 12 build of the pinned jax unless JAX already sees a
# GPU with pe_rlhf importable, prints what it installed, then runs device_check.py with --budget_s set to
# what is left of DEVICE_CHECK_TOTAL_S (default 560 s, install included; at most 420 s for the steps).
# The JSON goes to $OUT/device_check.json ($OUT unset: ./device_check.json) unless --out is given.
# Exits non-zero when the install fails or JAX sees no GPU.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
PY=${PYTHON:-python3}
JAX_VERSION=${JAX_VERSION:-0.10.2}  # setup.py pins jax>=0.10.2,<0.11; jax[cuda12] pulls jax-cuda12-plugin of the same version
JAX_EXTRA=${JAX_EXTRA:-cuda12}      # cuda13 for a machine whose driver wants it
TOTAL_S=${DEVICE_CHECK_TOTAL_S:-560}
OUT_DIR=${OUT:-.}
START=$SECONDS

echo "[device_check.sh] $(date -u +%FT%TZ) $($PY --version 2>&1) at $(command -v $PY)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

if $PY -c "import jax, flax, optax, pe_rlhf; assert jax.default_backend() == 'gpu'" 2>/dev/null; then
    echo "[device_check.sh] JAX already sees a GPU and pe_rlhf imports: nothing to install"
else
    echo "[device_check.sh] installing: pip install -e . 'jax[$JAX_EXTRA]==$JAX_VERSION' (log: $OUT_DIR/pip_install.log)"
    if ! $PY -m pip install --progress-bar off -e . "jax[$JAX_EXTRA]==$JAX_VERSION" >"$OUT_DIR/pip_install.log" 2>&1; then
        tail -n 30 "$OUT_DIR/pip_install.log"
        echo "[device_check.sh] pip install failed (above); nothing was measured" >&2
        exit 4
    fi
    echo "[device_check.sh] installed in $((SECONDS - START)) s"
fi
$PY -m pip list 2>/dev/null | grep -iE '^(jax|jaxlib|jax-cuda[0-9]+-(plugin|pjrt)|flax|optax|nvidia-(cudnn|cublas|cuda-runtime)-cu[0-9]+) '

LEFT=$((TOTAL_S - (SECONDS - START)))
BUDGET=$((LEFT < 420 ? LEFT : 420))
BUDGET=$((BUDGET < 30 ? 30 : BUDGET))  # enough to start JAX and say what it sees
if [ "$LEFT" -lt 60 ]; then
    echo "[device_check.sh] only ${BUDGET} s left of ${TOTAL_S} s after installing; running what fits" >&2
fi
exec $PY experiments/device_check.py --out "$OUT_DIR/device_check.json" --budget_s "$BUDGET" "$@"
