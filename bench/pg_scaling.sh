#!/usr/bin/env bash
# How PostgreSQL backup and restore scale with the database: at one size, in one run,
#   pg_dump -Fc -Z0 > /dev/null       and   lifeboat backup → local directory
#   pg_restore -j2 from a local file  and   lifeboat restore (streamed)
# bench/run.sh full calls it for about 100 MB, 1 GB and 4 GB; peak RSS must stay flat.
# Usage: bench/pg_scaling.sh ROWS   (5500000 rows ≈ 1 GB; RUNS=3)
. "$(dirname "$0")/lib.sh"
rows=${1:?rows}
bench_setup "$rows"
eval "$pg_dump_cmd" > "$work/dump.pgdump"
restore_commands

echo "== measuring ($runs runs each)" >&2
measure "pg_dump -Fc -Z0 > /dev/null" "$pg_dump_cmd"
measure "lifeboat backup → local directory" "'$lifeboat' backup --policy '$work/fs.toml'" \
  "stored=\$(du -sb '$work/repo/backups' | cut -f1); rm -rf '$work/repo'"
"$lifeboat" backup --policy "$work/fs.toml" 2>/dev/null
eval "$fresh" >/dev/null
measure "pg_restore -j2 from a local file" \
  "'$PG_BIN/pg_restore' -h 127.0.0.1 -p $PG_PORT -U postgres -d target --exit-on-error -j2 '$work/dump.pgdump'" \
  "$drop; $fresh >/dev/null"
eval "$drop"
measure "lifeboat restore (streamed)" "'$lifeboat' restore --policy '$work/fs.toml' --source bench --to $target" "$drop"
BENCH_SCALE=${BENCH_SCALE:-$rows} summarize "pg_dump -Fc -Z0 > /dev/null" "pg_scaling-$rows" \
  "$rows rows, pg_dump -Fc -Z0 $(($(stat -c %s "$work/dump.pgdump") / 1048576)) MiB, stored $((stored / 1048576)) MiB"
