#!/usr/bin/env bash
# PostgreSQL backup benchmark, all in one run on throwaway local servers:
#   pg_dump -Fc -Z0 > /dev/null            the source's own speed
#   zstd -3 (1 and 2 threads) over the dump  the compression stage alone
#   pg_dump | zstd -3 | age | aws s3 cp -   the hand pipe into a local S3 (moto)
#   lifeboat backup → S3 (moto), → local directory
# Each is run RUNS times (default 3); the median wall time and the peak RSS are reported, with
# ratios. Writes bench/results/<UTC date>-pg_backup.json and prints a Markdown table.
# Usage: bench/pg_backup.sh [ROWS]   (default 5500000 rows ≈ 1 GB of realistic table data)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
rows=${1:-5500000}
runs=${RUNS:-3}

scripts/install-deps.sh
command -v /usr/bin/time >/dev/null 2>&1 || { apt-get install -y -qq time >/dev/null; }
venv=${MOTO_VENV:-target/moto-venv}
[ -x "$venv/bin/aws" ] || "$venv/bin/pip" install -q --disable-pip-version-check awscli
cargo build --release --quiet --bins
lifeboat=$root/target/release/lifeboat

work=$root/bench/work
rm -rf "$work" && mkdir -p "$work"
. scripts/lib/throwaway-pg.sh
PG_EXTRA_OPTS="-c shared_buffers=256MB -c max_wal_size=4GB -c checkpoint_timeout=30min"
pg_start
s3port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$venv/bin/moto_server" -H 127.0.0.1 -p "$s3port" >"$work/moto.log" 2>&1 &
moto_pid=$!
cleanup() { kill "$moto_pid" 2>/dev/null || true; pg_stop; }
trap cleanup EXIT
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true
endpoint=http://127.0.0.1:$s3port
aws() { "$root/$venv/bin/aws" --endpoint-url "$endpoint" "$@"; }
for _ in $(seq 1 100); do aws s3 ls >/dev/null 2>&1 && break; sleep 0.2; done
aws s3 mb s3://bench >/dev/null

echo "== loading $rows rows of realistic data" >&2
pg_psql -d postgres -c "create database bench"
pg_psql -d bench <<SQL
create table events as
select g as id,
       timestamptz '2026-01-01' + (g || ' seconds')::interval as ts,
       (random() * 1e9)::int as n,
       md5(random()::text) as h,
       substr(md5(random()::text), 1, (random() * 24)::int) as note,
       jsonb_build_object('k', (random() * 100)::int, 'tag', substr(md5(g::text), 1, 8)) as attrs
from generate_series(1, $rows) g;
alter table events add primary key (id);
vacuum analyze events;
SQL
db_size=$(pg_psql -d bench -tA -c "select pg_database_size('bench')")

"$lifeboat" keygen > "$work/key.txt" 2>/dev/null
recipient=$(sed -n 's/^# public key: //p' "$work/key.txt")
cat > "$work/s3.toml" <<TOML
[repository]
url = "s3://bench/lifeboat"
endpoint = "$endpoint"
[encryption]
recipients = ["$recipient"]
[defaults]
retention = { keep_last = 1 }
[[sources]]
name = "bench"
kind = "postgres"
url = "postgres://postgres@127.0.0.1:$PG_PORT/bench"
globals = false
TOML
sed -e "s|^url = \"s3://bench/lifeboat\"|url = \"file://$work/repo\"|" -e '/^endpoint/d' "$work/s3.toml" > "$work/fs.toml"

pg_dump_cmd="'$PG_BIN/pg_dump' -h 127.0.0.1 -p $PG_PORT -U postgres -Fc -Z0 bench"
eval "$pg_dump_cmd" > "$work/dump.pgdump"
dump_size=$(stat -c %s "$work/dump.pgdump")

: > "$work/results.tsv"
measure() {
  local name=$1 cmd=$2 after=${3:-true}
  for i in $(seq 1 "$runs"); do
    /usr/bin/time -f '%e %U %S %M' -o "$work/time" bash -c "set -o pipefail; $cmd" >/dev/null 2>"$work/err" \
      || { echo "$name failed:" >&2; cat "$work/err" >&2; exit 1; }
    printf '%s\t%s\t%s\n' "$name" "$i" "$(tail -n 1 "$work/time" | tr ' ' '\t')" >> "$work/results.tsv"
    echo "   $name run $i: $(tail -n 1 "$work/time")" >&2
    eval "$after"
  done
}
echo "== measuring ($runs runs each)" >&2
measure "pg_dump -Fc -Z0 > /dev/null" "$pg_dump_cmd"
measure "zstd -3 (1 thread) over the dump" "zstd -3 -q -c '$work/dump.pgdump'"
measure "zstd -3 -T2 over the dump" "zstd -3 -T2 -q -c '$work/dump.pgdump'"
measure "pg_dump | zstd -3 | age | aws s3 cp -" \
  "$pg_dump_cmd | zstd -3 -q | age -r $recipient | '$root/$venv/bin/aws' --endpoint-url $endpoint s3 cp - s3://bench/hand/dump.zst.age" \
  "aws s3 rm --quiet --recursive s3://bench/hand/"
measure "lifeboat backup → S3 (moto)" "'$lifeboat' backup --policy '$work/s3.toml'" \
  "stored=\$('$lifeboat' list --policy '$work/s3.toml' --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0][\"size_stored\"])'); aws s3 rm --quiet --recursive s3://bench/lifeboat/backups/"
measure "lifeboat backup → local directory" "'$lifeboat' backup --policy '$work/fs.toml'" "rm -rf '$work/repo'"

mkdir -p bench/results
python3 - "$work/results.tsv" "$db_size" "$dump_size" "${stored:-0}" "$rows" <<'PY'
import json, statistics, sys, datetime, platform, os
path, db_size, dump_size, stored, rows = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
data = {}
for line in open(path):
    name, run, wall, user, sys_, rss = line.rstrip("\n").split("\t")
    data.setdefault(name, []).append((float(wall), float(user) + float(sys_), int(rss)))
res = {}
for name, xs in data.items():
    walls = [x[0] for x in xs]
    res[name] = {
        "wall_median_s": statistics.median(walls), "wall_min_s": min(walls), "wall_max_s": max(walls),
        "cpu_median_s": statistics.median([x[1] for x in xs]), "peak_rss_mib": max(x[2] for x in xs) / 1024,
        "runs": len(xs),
    }
base = res["pg_dump -Fc -Z0 > /dev/null"]["wall_median_s"]
zstd1 = res["zstd -3 (1 thread) over the dump"]["wall_median_s"]
target = max(base, zstd1)
now = datetime.datetime.now(datetime.timezone.utc)
out = {"date": now.isoformat(timespec="seconds"), "rows": rows, "database_bytes": db_size,
       "dump_bytes": dump_size, "lifeboat_stored_bytes": stored, "cores": os.cpu_count(),
       "machine": platform.machine(), "results": res}
fname = f"bench/results/{now.strftime('%Y%m%dT%H%M%SZ')}-pg_backup.json"
json.dump(out, open(fname, "w"), indent=2)
print(f"Database {db_size/2**20:.0f} MiB ({rows} rows), dump {dump_size/2**20:.0f} MiB, "
      f"lifeboat stored {stored/2**20:.0f} MiB; {os.cpu_count()} cores; median of {res[next(iter(res))]['runs']} runs. Results: {fname}\n")
print("| pipeline | wall (median, min–max) | CPU (user+sys) | peak RSS | wall ÷ pg_dump | wall ÷ max(pg_dump, zstd -3) |")
print("|---|---|---|---|---|---|")
for name, r in res.items():
    print(f"| {name} | {r['wall_median_s']:.2f} s ({r['wall_min_s']:.2f}–{r['wall_max_s']:.2f}) | {r['cpu_median_s']:.2f} s | "
          f"{r['peak_rss_mib']:.0f} MiB | {r['wall_median_s']/base:.2f} | {r['wall_median_s']/target:.2f} |")
PY
