#!/usr/bin/env bash
# Run the whole test suite on every supported megatron-core, each in its own venv, and fail if any
# run fails (pytest's exit 5, "no tests collected", counts as a failure).
#   bash tools/test_all.sh [pytest args...]      # default: tests
# The venvs are made (or checked) by tools/bootstrap.sh: .venv (0.16.1), .venv-mcore0.19 (0.19.2).
set -uo pipefail
cd "$(dirname "$0")/.."
args=("$@"); [ ${#args[@]} -gt 0 ] || args=(tests)
rc=0
for mcore in 0.16.1 0.19.2; do
  case "$mcore" in 0.16.*) venv=.venv ;; 0.19.*) venv=.venv-mcore0.19 ;; esac
  bash tools/bootstrap.sh --test --mcore "$mcore" || { echo "[test_all] bootstrap for megatron-core $mcore failed"; rc=1; continue; }
  echo "[test_all] megatron-core $mcore ($venv): pytest ${args[*]}"
  # PYTHONPATH: this checkout's megatron_ling, also in subprocesses and console scripts
  PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$venv/bin/python" -m pytest "${args[@]}"
  r=$?
  [ $r -eq 5 ] && echo "[test_all] megatron-core $mcore: pytest ran no tests"
  [ $r -ne 0 ] && { echo "[test_all] megatron-core $mcore: FAILED (pytest exit $r)"; rc=1; }
done
[ $rc -eq 0 ] && echo "[test_all] passed on megatron-core 0.16.1 and 0.19.2"
exit $rc
