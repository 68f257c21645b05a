#!/usr/bin/env bash
# One go on a lent H100/H200 (well under 10 minutes): versions, then gpu_train_step.py's table.
#   bash benchmarks/gpu_run.sh [gpu_train_step.py flags, e.g. --layers 12 --steps 20]
# PYTHON picks the interpreter (default python3); DEPS_DIR, when set, is put on PYTHONPATH
# for pure-Python packages the device lacks (e.g. ml_collections copied from .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${DEPS_DIR:+:$DEPS_DIR}${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import jax, torch, transformers, flax, optax; print('jax', jax.__version__, jax.devices(), \
'| flax', flax.__version__, '| optax', optax.__version__, '| torch', torch.__version__, \
'| transformers', transformers.__version__)"
"$PY" -c "import phased_jax.train" || { echo "phased_jax does not import here (a missing package?)"; exit 1; }
timeout 540 "$PY" benchmarks/gpu_train_step.py "$@"
