#!/usr/bin/env bash
# The prepared GPU check (usage: the docstring of benchmarks/gpu_check.py). A thin wrapper: from the
# repository root, DeepSpeed's accelerator set for the device asked for, the venv's Python (or, on a
# machine without the venv, python3 plus any wheels carried in .whl/, installed outside the tree).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cpu=0
for arg in "$@"; do
    [[ "$arg" == "--cpu" ]] && cpu=1
done
if (( cpu )); then
    export DS_ACCELERATOR=cpu  # DeepSpeed's CPU accelerator (gloo), without its detection warning
elif [[ "${DS_ACCELERATOR:-}" == "cpu" ]]; then
    echo "gpu_check.sh: unsetting DS_ACCELERATOR=cpu for a GPU run (DeepSpeed would refuse the GPU)" >&2
    unset DS_ACCELERATOR
fi
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"  # DeepSpeed's JIT ops, cached
PY=.venv/bin/python
if [[ ! -x "$PY" ]]; then
    PY="${PYTHON:-python3}"
    if compgen -G ".whl/*.whl" >/dev/null; then  # e.g. pydantic, deepspeed for an image that lacks them
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/gpu_check_site .whl/*.whl
        export PYTHONPATH="/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi
exec "$PY" benchmarks/gpu_check.py "$@"
