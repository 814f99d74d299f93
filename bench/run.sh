#!/usr/bin/env bash
# Every benchmark in one go, on throwaway local servers; then one results file, tables and plots.
#
#   bench/run.sh quick   small sizes, one run each (a few minutes): CI runs it and fails if a
#                        lifeboat command's peak RSS exceeds its budget (bench/budgets.json).
#                        Results in target/bench-quick/; BENCHMARKS.md is left alone.
#   bench/run.sh full    the published numbers: PostgreSQL ~1 GB backup, restore and base
#                        backup (3 runs), the copy of that backup to a second S3 server, point-in-time restore with 1 GiB of WAL, Redis 1 M keys, objects 10k files and 1 M files of a few bytes, listing 3,000 backups, the idle agent for
#                        10 minutes, and the scaling runs (PostgreSQL ~100 MB/1 GB/4 GB; objects 1k/10k/100k).
#                        Writes bench/results/<date>.json, bench/plots/*.png and the tables in
#                        BENCHMARKS.md between their `<!-- bench:… -->` markers.
# SCALING=0 leaves the scaling runs out of `full`.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-quick}
stamp=$(date -u +%Y%m%dT%H%M%SZ)
case "$mode" in
  quick)
    out=target/bench-quick
    rm -rf "$out" && mkdir -p "$out/parts"
    export BENCH_RESULTS=$out/parts RUNS=${RUNS:-1}
    bench/pg_backup.sh 300000
    bench/pg_restore.sh 300000
    bench/pg_restore_jobs.sh 2
    bench/pg_basebackup.sh 300000
    LAG_SECONDS=30 bench/copy.sh 300000
    bench/wal_stream.sh 20 2s
    bench/redis.sh 100000
    OBJECTS_S3=0 bench/objects.sh 1000
    FILES=tiny bench/objects.sh 10000
    bench/catalog.sh 300
    bench/agent_idle.sh 20
    ;;
  full)
    out=bench
    mkdir -p bench/results "target/bench-full-$stamp"
    export BENCH_RESULTS=target/bench-full-$stamp
    RUNS=${RUNS:-3} bench/pg_backup.sh 5500000
    RUNS=${RUNS:-3} bench/pg_restore.sh 5500000
    RUNS=${RUNS:-3} bench/pg_restore_jobs.sh 20
    RUNS=${RUNS:-3} bench/pg_basebackup.sh 5500000
    RUNS=${RUNS:-3} bench/copy.sh 5500000
    bench/wal_stream.sh 300 30s
    RUNS=${RUNS:-3} bench/pitr.sh 5500000 1024
    RUNS=${RUNS:-3} bench/redis.sh 1000000
    RUNS=${RUNS:-3} bench/objects.sh 10000
    FILES=tiny bench/objects.sh 1000000
    RUNS=${RUNS:-3} bench/catalog.sh 3000
    bench/agent_idle.sh 600
    if [ "${SCALING:-1}" = 1 ]; then
      for rows in 550000 5500000 22000000; do
        RUNS=1 bench/pg_scaling.sh "$rows"
      done
      for n in 1000 10000 100000; do
        RUNS=1 OBJECTS_S3=0 BENCH_SCALE=$n BENCH_KIND_SUFFIX=_scaling-$n bench/objects.sh "$n"
      done
    fi
    ;;
  *)
    echo "usage: bench/run.sh [quick|full]" >&2
    exit 2
    ;;
esac
venv=${MOTO_VENV:-target/moto-venv}
"$venv/bin/python" -c 'import matplotlib' 2>/dev/null \
  || "$venv/bin/pip" install -q --disable-pip-version-check matplotlib
if [ "$mode" = quick ]; then
  "$venv/bin/python" bench/report.py --parts "$out/parts" --out "$out/$stamp.json" \
    --plots "$out/plots" --gate bench/budgets.json
else
  "$venv/bin/python" bench/report.py --parts "$BENCH_RESULTS" --out "bench/results/$stamp.json" \
    --plots bench/plots --markdown BENCHMARKS.md --gate bench/budgets.json
fi
