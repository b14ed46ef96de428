#!/usr/bin/env bash
# The accuracy table (bench/accuracy.py) built by processes side by side, for a machine with many cores or a GPU:
# PER_ROW processes for each group of rows, all adding to one table under --out and sharing its runs out (each run
# is made by the process that claims it first; the student alone comes along with every group), then --report writes
# the results. Every argument goes to every process (give --out, --seeds, --epochs, ... here).
# ROW_GROUPS: the groups, comma-separated (default: one per distillation row, a patient row with the row whose setting
# it reuses). PER_ROW: processes per group (default 1; up to the number of seeds pays). LOGS: folder of one log per
# process (default bench/out/logs). PYTHON: the interpreter (default python). TIME_LIMIT: seconds the processes may
# run in all; runs unfinished by then are left out, and rows are reported with the seeds they have.
# Example (GPU): TIME_LIMIT=600 PER_ROW=3 bash bench/accuracy_parallel.sh --in-memory --workers 2 --out /tmp/acc
set -uo pipefail
cd "$(dirname "$0")/.."
logs=${LOGS:-bench/out/logs}
python=${PYTHON:-python}
mkdir -p "$logs"
start=$(date +%s)
args=("$@")
failed=0 pids=()
limit=()
[ "${TIME_LIMIT:-0}" -gt 0 ] && limit=(timeout --signal=INT "$TIME_LIMIT")
IFS=, read -ra groups <<< "${ROW_GROUPS:-softtarget,dkd,dist,softtarget-std,hint hint-patient,fm fm-patient}"
for group in "${groups[@]}"; do
  for i in $(seq "${PER_ROW:-1}"); do
    # shellcheck disable=SC2086  # a group is a list of rows
    "${limit[@]}" "$python" bench/accuracy.py "${args[@]}" --resume --rows $group >"$logs/${group%% *}-$i.log" 2>&1 &
    pids+=($!)
  done
done
for pid in "${pids[@]}"; do wait "$pid" || failed=$((failed + 1)); done
echo "$failed process(es) failed or ran out of time; $(( ($(date +%s) - start) / 60 )) minutes so far"
"$python" bench/accuracy.py "$@" --report >"$logs/report.log" 2>&1 || { echo "report failed: see $logs/report.log"; exit 1; }
echo "table written after $(( ($(date +%s) - start) / 60 )) minutes"
