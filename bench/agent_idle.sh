#!/usr/bin/env bash
# Idle sidecar footprint: `lifeboat agent` with 10 scheduled sources that do not fire during the
# measurement. Reports RSS after start-up and at the end, and the CPU time used while idle.
# Usage: bench/agent_idle.sh [SECONDS]   (default 600)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-600}
cargo build --release --quiet --bins
work=$(mktemp -d)
trap 'kill "${pid:-}" 2>/dev/null || true; rm -rf "$work"' EXIT
target/release/lifeboat keygen > "$work/key.txt" 2>/dev/null
recipient=$(sed -n 's/^# public key: //p' "$work/key.txt")
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
{
  printf '[repository]\nurl = "file://%s/repo"\n[encryption]\nrecipients = ["%s"]\n' "$work" "$recipient"
  printf '[agent]\nlisten = "127.0.0.1:%s"\nlog_format = "json"\n[defaults]\nretention = { keep_last = 7 }\nschedule = "0 3 1 1 *"\n' "$port"
  for i in $(seq 1 10); do
    printf '[[sources]]\nname = "db-%s"\nkind = "postgres"\nurl = "postgres://backup@127.0.0.1:5432/db%s"\n' "$i" "$i"
  done
} > "$work/policy.toml"
target/release/lifeboat agent --policy "$work/policy.toml" 2>"$work/log" &
pid=$!
sleep 5
curl -sf "http://127.0.0.1:$port/healthz" >/dev/null || { echo "agent not healthy:"; cat "$work/log"; exit 1; }
ticks() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
rss() { awk '/VmRSS/ {print $2}' "/proc/$pid/status"; }
hz=$(getconf CLK_TCK)
rss_start=$(rss); t0=$(ticks)
sleep "$seconds"
t1=$(ticks); rss_end=$(rss); hwm=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
results=${BENCH_RESULTS:-bench/results}
mkdir -p "$results"
python3 - "$seconds" "$rss_start" "$rss_end" "$hwm" "$t0" "$t1" "$hz" "$results" <<'PY'
import datetime, json, os, sys
secs, r0, r1, hwm, t0, t1, hz = (float(x) for x in sys.argv[1:8])
cpu = (t1 - t0) / hz
now = datetime.datetime.now(datetime.timezone.utc)
name = "lifeboat agent, idle, 10 sources"
json.dump({"date": now.isoformat(timespec="seconds"), "note": f"idle for {secs:.0f} s", "cores": os.cpu_count(),
           "baseline": name, "results": {name: {
               "wall_median_s": secs, "wall_min_s": secs, "wall_max_s": secs, "cpu_median_s": cpu,
               "peak_rss_mib": hwm / 1024, "rss_start_mib": r0 / 1024, "rss_end_mib": r1 / 1024, "runs": 1}}},
          open(f"{sys.argv[8]}/{now.strftime('%Y%m%dT%H%M%SZ')}-agent_idle.json", "w"), indent=2)
print(f"idle agent, 10 sources, {secs:.0f} s: RSS {r0/1024:.1f} MiB after start, {r1/1024:.1f} MiB at the end "
      f"(peak {hwm/1024:.1f} MiB); CPU {cpu:.2f} s ({100 * cpu / secs:.3f}% of one core)")
PY
