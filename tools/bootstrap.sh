#!/usr/bin/env bash
# Create a venv (if needed) with torch 2.13.0, one megatron-core and megatron-ling installed editable.
#   bash tools/bootstrap.sh                         # runtime, megatron-core 0.16.1 in .venv
#   bash tools/bootstrap.sh --test                  # + test dependencies (pytest, the HF reference model)
#   bash tools/bootstrap.sh --test --mcore 0.19.2   # megatron-core 0.19.2 in .venv-mcore0.19
#   bash tools/bootstrap.sh --mcore 0.19.2 --print-venv   # only print that version's venv directory
# Supported megatron-core: 0.16.1 (the floor) through 0.19.x. Idempotent: a second run only checks.
# Works on a machine with only Python 3.10+ (0.19 declares >=3.12 but ships a cp311 wheel that runs on 3.11).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
want_test=0; MCORE=0.16.1; print_venv=0
while [ $# -gt 0 ]; do
  case "$1" in
    --test) want_test=1 ;;
    --mcore) MCORE=${2:?--mcore needs a version}; shift ;;
    --print-venv) print_venv=1 ;;
    *) echo "error: unknown argument '$1' (use --test, --mcore 0.16.1|0.19.2, --print-venv)" >&2; exit 2 ;;
  esac
  shift
done
case "$MCORE" in
  0.16.*) default_venv=.venv; extra=() ;;
  # 0.19 declares Requires-Python >=3.12; its cp311 wheel works on 3.11, so pip is told to ignore the
  # declaration for megatron-core only (everything else must still pick wheels made for this Python:
  # ignoring it there makes pip try to build e.g. contourpy 1.4 for 3.12).
  0.19.*) default_venv=.venv-mcore0.19; extra=(--ignore-requires-python) ;;
  *) echo "error: --mcore $MCORE is not a tested megatron-core (use 0.16.1 or 0.19.2)" >&2; exit 2 ;;
esac
VENV=${LING_VENV:-$default_venv}
[ $print_venv = 1 ] && { echo "$VENV"; exit 0; }
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
# Pin megatron-core for every later install so no dependency resolution moves it.
pin="$VENV/.megatron-core-pin.txt"
echo "megatron-core==$MCORE" > "$pin"
stamp="$VENV/.megatron-ling-installed$want_test-$MCORE"
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
  echo "[bootstrap] installing megatron-core==$MCORE and megatron-ling (editable)$([ $want_test = 1 ] && echo ' with test extras')"
  pip install -q "${extra[@]}" -c constraints.txt -c "$pin" "megatron-core==$MCORE"
  case "$MCORE" in
    # 0.19's pipeline schedules import triton unconditionally (even on CPU); it does not declare it.
    0.19.*) pip install -q -c constraints.txt triton ;;
  esac
  if [ $want_test = 1 ]; then
    pip install -q -c constraints.txt -c "$pin" -e ".[test]"
    # Independent HF BailingMoeV2 implementation used as the reference in conversion tests.
    pip install -q --no-deps nemo-automodel==0.7.0
  else
    pip install -q -c constraints.txt -c "$pin" -e .
  fi
  touch "$stamp"
fi
echo "[bootstrap] ready: $VENV ($("$VENV/bin/python" -c 'import torch, megatron.core as m; print("torch", torch.__version__, "megatron-core", m.__version__)' 2>/dev/null))"
