#!/usr/bin/env bash
# Run the whole test suite on every supported megatron-core, each in its own venv, and fail if any
# run fails (pytest's exit 5, "no tests collected", counts as a failure).
#   bash tools/test_all.sh                # the whole suite on both versions (what CI runs)
#   bash tools/test_all.sh [pytest args]  # given args: one plain pytest per version, one after the other
# The venvs are made (or checked) by tools/bootstrap.sh: .venv (0.16.1), .venv-mcore0.19 (0.19.2).
#
# The whole suite runs in two phases, so that the two versions share the machine's cores (one suite
# keeps ~1 of 2 cores busy on average: process start-ups, polling, single-rank steps):
#   1. both versions at once, every test except those marked `slurm` or `quiet` (pytest.ini);
#   2. the `slurm` and `quiet` tests, one version after the other: the local Slurm cluster listens on
#      fixed ports, and `quiet` tests measure wall time (bubbles, deadlock timeouts).
# The two marker expressions are complements, so every test runs once per version.
# Each run has its own pytest base temp and its own megatron-ling cache (the tokenizer and quick-start
# corpus built on first use), so the concurrent runs share no files.
set -uo pipefail
cd "$(dirname "$0")/.."
VERSIONS=(0.16.1 0.19.2)
SERIAL="slurm or quiet"
# each version needs its own venv, so a LING_VENV (one venv for a bootstrap) must not apply here
unset LING_VENV
venv_of() { bash tools/bootstrap.sh --mcore "$1" --print-venv; }  # bootstrap.sh owns version -> venv
work=$PWD/.test-work
rm -rf "$work" && mkdir -p "$work"

# pytest_run VERSION LABEL ARGS...: one pytest, its status in $work/VERSION-LABEL.rc, its output prefixed
pytest_run() {
  local mcore=$1 label=$2; shift 2
  local venv; venv=$(venv_of "$mcore")
  echo "[test_all] megatron-core $mcore ($venv) [$label]: pytest $*"
  (
    # PYTHONPATH: this checkout's megatron_ling, also in subprocesses and console scripts
    PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" MEGATRON_LING_CACHE="$work/cache-$mcore" \
      "$venv/bin/python" -m pytest -p no:cacheprovider --basetemp "$work/tmp-$mcore-$label" "$@"
    echo $? > "$work/$mcore-$label.rc"
  ) 2>&1 | sed -u "s/^/[$mcore] /"
}

rc=0
for mcore in "${VERSIONS[@]}"; do
  bash tools/bootstrap.sh --test --mcore "$mcore" || { echo "[test_all] bootstrap for megatron-core $mcore failed"; exit 1; }
done
if [ $# -gt 0 ]; then
  for mcore in "${VERSIONS[@]}"; do pytest_run "$mcore" args "$@"; done
  labels=(args)
else
  for mcore in "${VERSIONS[@]}"; do pytest_run "$mcore" shared tests -m "not ($SERIAL)" & done
  wait
  for mcore in "${VERSIONS[@]}"; do pytest_run "$mcore" alone tests -m "$SERIAL"; done
  labels=(shared alone)
fi
for mcore in "${VERSIONS[@]}"; do
  for label in "${labels[@]}"; do
    r=$(cat "$work/$mcore-$label.rc" 2>/dev/null || echo 1)
    [ "$r" -eq 5 ] && echo "[test_all] megatron-core $mcore [$label]: pytest ran no tests"
    [ "$r" -ne 0 ] && { echo "[test_all] megatron-core $mcore [$label]: FAILED (pytest exit $r)"; rc=1; }
  done
done
[ $rc -eq 0 ] && echo "[test_all] passed on megatron-core ${VERSIONS[*]}"
exit $rc
