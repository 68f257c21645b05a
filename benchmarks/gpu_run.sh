#!/usr/bin/env bash
# One go on a lent H100/H200 (well under 10 minutes): versions, then gpu_train_step.py's table.
#   bash benchmarks/gpu_run.sh [gpu_train_step.py flags, e.g. --layers 12 --steps 20]
# PYTHON picks the interpreter (default python3). DEPS_DIR (default .device_deps, if present) goes
# on PYTHONPATH for pure-Python packages the device lacks; ml_collections is the likely one:
#   mkdir -p .device_deps && cp -r .venv/lib/python3*/site-packages/ml_collections .device_deps/
# here before the run (an untracked, unignored folder travels with the work tree).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEPS_DIR=${DEPS_DIR:-$([ -d .device_deps ] && echo "$PWD/.device_deps" || true)}
export PYTHONPATH="$PWD${DEPS_DIR:+:$DEPS_DIR}${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import jax, torch, transformers, flax, optax; print('jax', jax.__version__, jax.devices(), \
'| flax', flax.__version__, '| optax', optax.__version__, '| torch', torch.__version__, \
'| transformers', transformers.__version__)"
"$PY" -c "import phased_jax.train" || { echo "phased_jax does not import here (a missing package?)"; exit 1; }
timeout 540 "$PY" benchmarks/gpu_train_step.py "$@"
