# Sourced by bench/*.sh: shared set-up and measurement.
#   bench_setup ROWS [s3]   deps, release build, a tuned throwaway PostgreSQL with the benchmark
#                           table in database `bench`, a key; with `s3` also moto + awscli
#   measure NAME CMD [AFTER]  runs CMD $RUNS times under GNU time, AFTER after each run
#   measure_own NAME CMD [AFTER]  one run; the peak RSS is CMD's own process, children excluded
#   summarize BASELINE KIND NOTE  median wall, CPU, peak RSS and ratios to BASELINE → JSON in
#                           $BENCH_RESULTS (default bench/results) + a Markdown table
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
runs=${RUNS:-3}
work=${BENCH_WORK:-$root/bench/work}
# Where result files go: bench/run.sh points this elsewhere for quick runs.
results=${BENCH_RESULTS:-bench/results}
venv=${MOTO_VENV:-target/moto-venv}

# A throwaway moto on a free port, its requests logged to $work/moto.log: sets moto_pid (the
# caller stops it), endpoint and the AWS_* variables, and returns once it answers.
moto_start() {
  s3port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  "$venv/bin/moto_server" -H 127.0.0.1 -p "$s3port" >"$work/moto.log" 2>&1 &
  moto_pid=$!
  export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true
  endpoint=http://127.0.0.1:$s3port
  for _ in $(seq 1 100); do aws s3 ls >/dev/null 2>&1 && break; sleep 0.2; done
}

bench_setup() {
  local rows=$1 want_s3=${2:-}
  scripts/install-deps.sh
  command -v /usr/bin/time >/dev/null 2>&1 || apt-get install -y -qq time >/dev/null
  if [ "$want_s3" = s3 ]; then
    [ -x "$venv/bin/aws" ] || "$venv/bin/pip" install -q --disable-pip-version-check awscli
  fi
  cargo build --release --quiet --bins
  lifeboat=$root/target/release/lifeboat
  verifier=$root/target/release/lifeboat-verifier
  rm -rf "$work" && mkdir -p "$work"
  . scripts/lib/throwaway-pg.sh
  PG_EXTRA_OPTS="-c shared_buffers=256MB -c max_wal_size=4GB -c checkpoint_timeout=30min -c maintenance_work_mem=256MB"
  pg_start
  moto_pid=
  bench_cleanup() { [ -n "$moto_pid" ] && kill "$moto_pid" 2>/dev/null; pg_stop; }
  trap bench_cleanup EXIT
  if [ "$want_s3" = s3 ]; then
    moto_start
    aws s3 mb s3://bench >/dev/null
  fi
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
  cat > "$work/fs.toml" <<TOML
[repository]
url = "file://$work/repo"
[encryption]
recipients = ["$recipient"]
identity_file = "$work/key.txt"
[defaults]
retention = { keep_last = 1 }
[[sources]]
name = "bench"
kind = "postgres"
url = "postgres://postgres@127.0.0.1:$PG_PORT/bench"
globals = false
# The bench databases are small; the bench machine's disk also holds the build.
[sources.verify]
scratch_keep_free = "256MiB"
TOML
  pg_dump_cmd="'$PG_BIN/pg_dump' -h 127.0.0.1 -p $PG_PORT -U postgres -Fc -Z0 bench"
  : > "$work/results.tsv"
}

aws() { "$root/$venv/bin/aws" --endpoint-url "$endpoint" "$@"; }

# Commands of the restore benchmarks, for measure: $fresh (an empty database `target`), $drop
# (none), $target (its URL) and $restore (pg_restore into it).
restore_commands() {
  pg="'$PG_BIN/psql' -X -q -h 127.0.0.1 -p $PG_PORT -U postgres -d postgres"
  fresh="$pg -c 'drop database if exists target' -c 'create database target'"
  drop="$pg -c 'drop database if exists target' >/dev/null"
  target="postgresql://postgres@127.0.0.1:$PG_PORT/target"
  restore="'$PG_BIN/pg_restore' -h 127.0.0.1 -p $PG_PORT -U postgres -d target --exit-on-error"
}

# MEASURE_RUNS=1 takes one run, for benchmarks that interleave their commands' runs.
measure() {
  local name=$1 cmd=$2 after=${3:-true}
  for i in $(seq 1 "${MEASURE_RUNS:-$runs}"); do
    # The previous run's dirty pages are written out before, not during, this one.
    sync
    /usr/bin/time -f '%e %U %S %M' -o "$work/time" bash -c "set -o pipefail; $cmd" >/dev/null 2>"$work/err" \
      || { echo "$name failed:" >&2; cat "$work/err" >&2; exit 1; }
    printf '%s\t%s\t%s\n' "$name" "$i" "$(tail -n 1 "$work/time" | tr ' ' '\t')" >> "$work/results.tsv"
    echo "   $name run $i: $(tail -n 1 "$work/time")" >&2
    eval "$after"
  done
}

# Like measure, for one run, but the peak RSS is that of the process CMD starts alone (its
# VmHWM, polled), not of its children too: `lifeboat backup` without the pg_dump it runs.
measure_own() {
  local name=$1 cmd=$2 after=${3:-true}
  sync
  local start end peak=0 ticks=0 v t hz
  hz=$(getconf CLK_TCK)
  start=$(date +%s.%N)
  bash -c "exec $cmd" >/dev/null 2>"$work/err" &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    v=$(awk '/^VmHWM/ {print $2}' "/proc/$pid/status" 2>/dev/null || true)
    [ -n "$v" ] && peak=$v
    # utime and stime (its own, as far as the last poll saw them).
    t=$(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || true)
    [ -n "$t" ] && ticks=$t
    sleep 0.02
  done
  wait "$pid" || { echo "$name failed:" >&2; cat "$work/err" >&2; exit 1; }
  end=$(date +%s.%N)
  printf '%s\t1\t%s\t%s\t0\t%s\n' "$name" "$(echo "$end - $start" | bc)" \
    "$(echo "scale=2; $ticks / $hz" | bc)" "$peak" >> "$work/results.tsv"
  echo "   $name: $(echo "$end - $start" | bc) s, own peak RSS $peak KiB" >&2
  eval "$after"
}

summarize() {
  local baseline=$1 kind=$2 note=$3
  mkdir -p "$results"
  python3 - "$work/results.tsv" "$baseline" "$kind" "$note" "$db_size" "$results" <<'PY'
import json, statistics, sys, datetime, os
path, baseline, kind, note, db_size, out = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6]
data = {}
for line in open(path):
    name, run, wall, user, sys_, rss = line.rstrip("\n").split("\t")
    data.setdefault(name, []).append((float(wall), float(user) + float(sys_), int(rss)))
res = {name: {"wall_median_s": statistics.median([x[0] for x in xs]), "wall_min_s": min(x[0] for x in xs),
              "wall_max_s": max(x[0] for x in xs), "cpu_median_s": statistics.median([x[1] for x in xs]),
              "peak_rss_mib": max(x[2] for x in xs) / 1024, "runs": len(xs)} for name, xs in data.items()}
# Repository requests by command, where the benchmark counted them (NAME TAB JSON).
asked = os.path.join(os.path.dirname(path), "requests.tsv")
if os.path.exists(asked):
    for line in open(asked):
        name, counts = line.rstrip("\n").split("\t")
        res[name]["requests"] = json.loads(counts)
base = res[baseline]["wall_median_s"]
now = datetime.datetime.now(datetime.timezone.utc)
fname = f"{out}/{now.strftime('%Y%m%dT%H%M%SZ')}-{kind}.json"
json.dump({"date": now.isoformat(timespec="seconds"), "database_bytes": db_size, "note": note,
           "scale": os.environ.get("BENCH_SCALE"),
           "cores": os.cpu_count(), "baseline": baseline, "results": res}, open(fname, "w"), indent=2)
print(f"{note}; database {db_size / 2**20:.0f} MiB; {os.cpu_count()} cores; median of {next(iter(res.values()))['runs']} runs. Results: {fname}\n")
asked = any("requests" in r for r in res.values())
print(f"| command | wall (median, min–max) | CPU (user+sys) | peak RSS | wall ÷ {baseline} |" + (" repository requests |" if asked else ""))
print("|---|---|---|---|---|" + ("---|" if asked else ""))
for name, r in res.items():
    counts = ", ".join(f"{c} {op.upper()}" for op, c in r.get("requests", {}).items() if c)
    print(f"| {name} | {r['wall_median_s']:.2f} s ({r['wall_min_s']:.2f}–{r['wall_max_s']:.2f}) | {r['cpu_median_s']:.2f} s | {r['peak_rss_mib']:.0f} MiB | {r['wall_median_s'] / base:.2f} |" + (f" {counts or 'none'} |" if asked else ""))
PY
}
