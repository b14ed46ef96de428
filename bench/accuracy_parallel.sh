#!/usr/bin/env bash
# The accuracy table (bench/accuracy.py) built by processes side by side, for a machine with many cores or a GPU:
# the student alone and the patient student alone first, then one process per distillation row (function matching
# and its patient row in one, as the patient row reuses its setting), all adding to one table under --out; then
# --report writes the results. Every argument goes to every process (give --out, --seeds, --epochs, ... here).
# LOGS: folder of one log per process (default bench/out/logs). PYTHON: the interpreter (default python).
# TIME_LIMIT: seconds the processes may run in all, from the start; rows unfinished by then are reported with the
# seeds they have.
# Example (GPU): TIME_LIMIT=600 bash bench/accuracy_parallel.sh --in-memory --workers 2 --out /tmp/acc
set -uo pipefail
cd "$(dirname "$0")/.."
logs=${LOGS:-bench/out/logs}
python=${PYTHON:-python}
mkdir -p "$logs"
start=$(date +%s)
rows() {  # rows LOG ROW...: one process adding ROWs to the table, stopped at the TIME_LIMIT
  local log=$1 left=0; shift
  if [ "${TIME_LIMIT:-0}" -gt 0 ]; then left=$(( TIME_LIMIT - ($(date +%s) - start) )); [ $left -gt 0 ] || left=1; fi
  timeout --signal=INT $left "$python" bench/accuracy.py "${args[@]}" --resume --rows "$@" >"$logs/$log.log" 2>&1
}
args=("$@")
rows alone alone & alone=$!
rows alone-patient alone-patient &
wait $alone || { echo "the student alone failed or ran out of time: see $logs/alone.log"; exit 1; }
failed=0 pids=()
for row in softtarget dkd dist softtarget-std hint 'fm fm-patient'; do rows ${row%% *} $row & pids+=($!); done
for pid in "${pids[@]}"; do wait "$pid" || failed=$((failed + 1)); done
wait
echo "$failed distillation process(es) failed or ran out of time; $(( ($(date +%s) - start) / 60 )) minutes so far"
"$python" bench/accuracy.py "$@" --report >"$logs/report.log" 2>&1 || { echo "report failed: see $logs/report.log"; exit 1; }
echo "table written after $(( ($(date +%s) - start) / 60 )) minutes"
