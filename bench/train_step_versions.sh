#!/usr/bin/env bash
# bench/train_step.py on megatron-core 0.16.1 (.venv) and 0.19.2 (.venv-mcore0.19), same model and
# layout, alternating ROUNDS times to spread machine noise over both; prints each version's best
# megatron-ling step time and the 0.19.2 / 0.16.1 ratio.
#   bash bench/train_step_versions.sh [ROUNDS] [train_step.py args...]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-2}; shift || true
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
declare -A best
for ((r = 1; r <= rounds; r++)); do
  for v in 0.16.1:.venv 0.19.2:.venv-mcore0.19; do
    name=${v%%:*}; venv=${v#*:}
    t=$("$venv/bin/python" bench/train_step.py "$@" 2>/dev/null | awk -F'|' '/megatron-ling \(Ling stack\)/ {gsub(/ /, "", $3); print $3}')
    echo "round $r megatron-core $name: megatron-ling step $t s"
    if [ -z "${best[$name]:-}" ] || awk "BEGIN {exit !($t < ${best[$name]})}"; then best[$name]=$t; fi
  done
done
echo "date $(date -u +%F), $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "| megatron-core | step time (s, best) | ratio |"
echo "|---|---|---|"
echo "| 0.16.1 | ${best[0.16.1]} | 1.000 |"
echo "| 0.19.2 | ${best[0.19.2]} | $(awk "BEGIN {printf \"%.3f\", ${best[0.19.2]} / ${best[0.16.1]}}") |"
