#!/usr/bin/env bash
# Where the time goes, for the benchmark table (release build, a local directory repository):
#   backup    `perf record` of `lifeboat backup` and its pg_dump child, by shared object and
#             symbol: pg_dump's stream parsing, SHA-256, zstd, age, the fingerprint's row hashing
#   restore   `lifeboat restore` into a fresh database, perf over the whole machine (the server's
#             backend does most of the work), by process and symbol, after pg_restore's own
#             time from a local file
#   verify    `lifeboat-verifier verify`: its report's phases (download, restore, index build,
#             read-back, checks), then perf of the verifier with its scratch cluster and
#             pg_restore, by process and symbol
# The table has its primary key and two more indexes for restore and verify, as in
# bench/pg_restore.sh. Needs perf (linux-perf; installed if missing).
# Usage: bench/profile.sh [backup|restore|verify] [ROWS]   (default backup, 2000000 rows ≈ 300 MB)
. "$(dirname "$0")/lib.sh"
command -v perf >/dev/null 2>&1 || apt-get install -y -qq linux-perf >/dev/null
mode=backup
case "${1:-}" in
  backup | restore | verify) mode=$1; shift ;;
esac
rows=${1:-2000000}
bench_setup "$rows"
mkdir -p "$results"
out=$results/$(date -u +%Y%m%dT%H%M%SZ)-profile-$mode.txt
pg="'$PG_BIN/psql' -X -q -h 127.0.0.1 -p $PG_PORT -U postgres -d postgres"
target="postgresql://postgres@127.0.0.1:$PG_PORT/target"
if [ "$mode" != backup ]; then
  pg_psql -d bench -c "create index on events (ts)" -c "create index on events (h)"
  "$lifeboat" backup --policy "$work/fs.toml" 2>/dev/null
fi

# perf's samples of the recording, by process and shared object, then by symbol.
report() {
  set +o pipefail # `head` closes the pipes early
  perf report -i "$work/perf.data" --stdio --no-children --sort comm,dso -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -20
  echo
  echo "# top symbols"
  perf report -i "$work/perf.data" --stdio --no-children --sort comm,symbol -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -40
  set -o pipefail
}

case "$mode" in
  backup)
    perf record -q -F 499 -g -o "$work/perf.data" -- "$lifeboat" backup --policy "$work/fs.toml" 2>/dev/null
    {
      echo "# lifeboat backup of $rows rows ($(du -sm "$work/repo" | cut -f1) MiB stored), perf samples by shared object"
      report
    } > "$out"
    ;;
  restore)
    eval "$pg_dump_cmd" > "$work/dump.pgdump"
    eval "$pg -c 'create database target'"
    /usr/bin/time -f %e -o "$work/plain.s" "$PG_BIN/pg_restore" -h 127.0.0.1 -p "$PG_PORT" -U postgres -d target --exit-on-error "$work/dump.pgdump"
    eval "$pg -c 'drop database target'"
    /usr/bin/time -f %e -o "$work/took.s" perf record -q -a -F 499 -g -o "$work/perf.data" -- "$lifeboat" restore --policy "$work/fs.toml" --source bench --to "$target" >/dev/null 2>&1
    {
      echo "# lifeboat restore of $rows rows: $(cat "$work/took.s") s under perf; pg_restore from a local file: $(cat "$work/plain.s") s"
      echo "# perf samples of the whole machine, by process and shared object"
      report
    } > "$out"
    ;;
  verify)
    "$verifier" verify --policy "$work/fs.toml" --source bench 2> "$work/verify.txt" >/dev/null
    perf record -q -F 499 -g -o "$work/perf.data" -- "$verifier" verify --policy "$work/fs.toml" --source bench >/dev/null 2>&1
    {
      echo "# lifeboat-verifier verify of $rows rows: its phases (a run without perf)"
      grep -E "verified|time:" "$work/verify.txt"
      echo
      echo "# perf samples of the verifier and its children (scratch cluster, pg_restore), by process and shared object"
      report
    } > "$out"
    ;;
esac
cat "$out"
