#!/usr/bin/env bash
# Create .venv (if needed) with torch 2.13.0 and megatron-ling installed editable.
#   bash tools/bootstrap.sh          # runtime
#   bash tools/bootstrap.sh --test   # + test dependencies (pytest, the HF reference model)
# Idempotent: a second run only checks. Works on a machine with only Python 3.10+.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${LING_VENV:-.venv}
want_test=0; [ "${1:-}" = "--test" ] && want_test=1
if [ ! -x "$VENV/bin/python" ]; then
  echo "[bootstrap] creating $VENV"
  "$PY" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip "$@"; }
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  echo "[bootstrap] installing torch==2.13.0"
  pip install -q --upgrade pip
  pip install -q torch==2.13.0
fi
stamp="$VENV/.megatron-ling-installed$want_test"
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ]; then
  echo "[bootstrap] installing megatron-ling (editable)$([ $want_test = 1 ] && echo ' with test extras')"
  if [ $want_test = 1 ]; then
    pip install -q -c constraints.txt -e ".[test]"
    # Independent HF BailingMoeV2 implementation used as the reference in conversion tests.
    pip install -q --no-deps nemo-automodel==0.7.0
  else
    pip install -q -c constraints.txt -e .
  fi
  touch "$stamp"
fi
echo "[bootstrap] ready: $VENV ($("$VENV/bin/python" -c 'import torch, megatron.core as m; print("torch", torch.__version__, "megatron-core", m.__version__)'))"
