#!/bin/bash
# Profiles the relay during session setup and splits its CPU into phases (docs/BENCHMARKING.md,
# "Session setup"). Usage: loadtest/tools/setup-profile.sh HATCH_LOADTEST_BINARY OUT_PREFIX
# [SESSIONS]. Needs perf (Debian: linux-perf) and python3; writes OUT.json (the load test's
# report), OUT.perf.data and OUT.txt (perf script), and prints the split.
set -euo pipefail
BIN=$1
OUT=$2
N=${3:-6000}
SECS=${PERF_SECS:-4}
"$BIN" --sessions "$N" --ramp 3000 --duration 3 --skip-floor --json >"$OUT.json" 2>"$OUT.err" &
LT=$!
# Agents first; the clients start right after this line.
for _ in $(seq 1 400); do
    grep -q "agents online" "$OUT.err" 2>/dev/null && break
    sleep 0.05
done
PID=$(pgrep -P "$LT" -f relay-process | head -1)
perf record -q -F 999 --call-graph dwarf,16384 -p "$PID" -o "$OUT.perf.data" -- sleep "$SECS"
wait "$LT"
perf script -i "$OUT.perf.data" -F comm,tid,period,ip,sym 2>/dev/null >"$OUT.txt"
US=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['setup']['relay_cpu_us_per_session'])" "$OUT.json")
python3 "$(dirname "$0")/perf_phases.py" "$OUT.txt" "$US"
