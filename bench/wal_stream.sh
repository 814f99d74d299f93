#!/usr/bin/env bash
# WAL streaming benchmark (kind = "postgres-physical" with wal), in one run on throwaway local
# servers: under a sustained pgbench write load, `lifeboat wal stream` into S3 (moto) beside
# `pg_receivewal -D dir` (the server's own receiver, to the local disk), each from its own slot.
# Reports each one's CPU and peak RSS, and for lifeboat the archive lag (p50/p99, in seconds and
# bytes, sampled every second as a user would: the server's LSN against the end of what is in the
# bucket) and the objects stored per hour.
# Usage: bench/wal_stream.sh [SECONDS] [FLUSH_INTERVAL]   (default 120 s, 10s)
. "$(dirname "$0")/lib.sh"
seconds=${1:-120}
flush=${2:-10s}
bench_setup 1000 s3
"$PG_BIN/pgbench" -h 127.0.0.1 -p "$PG_PORT" -U postgres -i -s 20 -q bench >/dev/null 2>&1
cat > "$work/wal.toml" <<TOML
[repository]
url = "s3://bench/wal"
endpoint = "$endpoint"
[encryption]
recipients = ["$recipient"]
[defaults]
retention = { keep_last = 1 }
[[sources]]
name = "bench"
kind = "postgres-physical"
url = "postgres://postgres@127.0.0.1:$PG_PORT/bench"
wal = { slot = "bench_lifeboat", flush_interval = "$flush" }
TOML
pg_psql -d postgres -c "select pg_create_physical_replication_slot('bench_receivewal', true)" >/dev/null
mkdir -p "$work/receivewal"
/usr/bin/time -f '%e %U %S %M' -o "$work/time-receivewal" \
  "$PG_BIN/pg_receivewal" -h 127.0.0.1 -p "$PG_PORT" -U postgres -D "$work/receivewal" -S bench_receivewal --no-loop 2>"$work/receivewal.log" &
rw_time=$!
LIFEBOAT_LOG=debug /usr/bin/time -f '%e %U %S %M' -o "$work/time-lifeboat" \
  "$lifeboat" wal stream --policy "$work/wal.toml" --source bench 2>"$work/stream.log" &
lb_time=$!
sleep 3
echo "== pgbench for ${seconds}s, sampling the archive every second" >&2
"$PG_BIN/pgbench" -h 127.0.0.1 -p "$PG_PORT" -U postgres -c 2 -T "$seconds" -n bench >"$work/pgbench.log" 2>&1 &
bench_pid=$!
: > "$work/samples.tsv"
while kill -0 "$bench_pid" 2>/dev/null; do
  server=$(pg_psql -d postgres -tA -c "select pg_current_wal_lsn() - '0/0'")
  keys=$(aws s3 ls --recursive s3://bench/wal/wal/bench/ | awk '{print $4}' | tr '\n' ' ')
  printf '%s\t%s\t%s\n' "$(date +%s.%N)" "$server" "$keys" >> "$work/samples.tsv"
  sleep 1
done
sleep 2
kill -TERM "$(pgrep -P "$lb_time")" "$(pgrep -P "$rw_time")" 2>/dev/null || true
wait "$lb_time" "$rw_time" 2>/dev/null || true
mkdir -p "$results"
python3 - "$work" "$seconds" "$flush" "$db_size" "$results" <<'PY'
import datetime, json, os, statistics, sys
work, seconds, flush, db_size, out = sys.argv[1], float(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
seg = 16 << 20
def end(keys):
    best = 0
    for k in keys.split():
        name = k.rsplit("/", 1)[-1]
        if len(name) < 24:
            continue
        try:
            start = (int(name[8:16], 16) << 32) + int(name[16:24], 16) * seg
        except ValueError:
            continue
        parts = name.split(".")
        best = max(best, start + (int(parts[2], 16) if parts[1] == "partial" else seg))
    return best
samples = []
for line in open(f"{work}/samples.tsv"):
    t, server, keys = (line.rstrip("\n").split("\t") + [""])[:3]
    samples.append((float(t), int(server), end(keys)))
lag_bytes, lag_s = [], []
for t, server, archived in samples[5:]:
    lag_bytes.append(max(0, server - archived))
    # How old the archive's end is: when the server was last at or before it.
    older = [t0 for t0, s0, _ in samples if s0 <= archived]
    lag_s.append(t - max(older) if older else t - samples[0][0])
def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else 0
stored = sum(1 for l in open(f"{work}/stream.log") if "Stored the growing WAL segment" in l or "Stored a WAL segment" in l)
def timing(name):
    wall, user, sys_, rss = open(f"{work}/time-{name}").read().split()[-4:]
    return {"wall_median_s": float(wall), "wall_min_s": float(wall), "wall_max_s": float(wall),
            "cpu_median_s": float(user) + float(sys_), "peak_rss_mib": int(rss) / 1024, "runs": 1}
res = {"pg_receivewal -D dir (local disk)": timing("receivewal"), "lifeboat wal stream → S3 (moto)": timing("lifeboat")}
wal_bytes = samples[-1][1] - samples[0][1] if samples else 0
note = (f"pgbench -c 2 for {seconds:.0f} s ({wal_bytes / 2**20:.0f} MiB of WAL), flush_interval {flush}: "
        f"archive lag p50 {pct(lag_s, 50):.1f} s / p99 {pct(lag_s, 99):.1f} s, "
        f"{pct(lag_bytes, 50) / 2**20:.1f} / {pct(lag_bytes, 99) / 2**20:.1f} MiB; "
        f"{stored} objects stored, {stored * 3600 / seconds:.0f} per hour")
now = datetime.datetime.now(datetime.timezone.utc)
json.dump({"date": now.isoformat(timespec="seconds"), "database_bytes": db_size, "note": note, "scale": None,
           "cores": os.cpu_count(), "baseline": "pg_receivewal -D dir (local disk)", "results": res},
          open(f"{out}/{now.strftime('%Y%m%dT%H%M%SZ')}-wal_stream.json", "w"), indent=2)
print(note)
for k, r in res.items():
    print(f"| {k} | {r['wall_median_s']:.1f} s | CPU {r['cpu_median_s']:.2f} s | {r['peak_rss_mib']:.0f} MiB |")
PY
