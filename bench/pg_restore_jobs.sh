#!/usr/bin/env bash
# PostgreSQL restore with parallel jobs, on a database of many tables, in one run on a throwaway
# local server:
#   pg_restore -j2 from a local dump file                the baseline
#   lifeboat restore --jobs 2: schema from the dump's TOC, the tables' data loaded on 2
#     connections at once straight from the downloaded (checked) object, no plaintext spool, then
#     the indexes and constraints with pg_restore -j2
#   lifeboat restore --jobs 2 from a local S3 (moto), the same backup copied there: checked whole
#     in one GET, then each table read by ranged GETs (nothing of it on this machine's disk)
#   lifeboat restore (streamed, one job)
#   pg_restore (one job) from the same file through stdin
# The database: pgbench's tables at scale SCALE, the benchmark's events table (75,000 × SCALE
# rows, three indexes) and a dozen tables of mixed sizes (125 × SCALE × i² rows for i = 1…12)
# with a primary key and two more indexes each.
# Usage: bench/pg_restore_jobs.sh [SCALE]   (default 20 ≈ 1 GB; RUNS=3)
. "$(dirname "$0")/lib.sh"
scale=${1:-20}
bench_setup $((scale * 75000)) s3
pg_psql -d bench -c "create index on events (ts)" -c "create index on events (h)"
"$PG_BIN/pgbench" -i -q -s "$scale" -h 127.0.0.1 -p "$PG_PORT" -U postgres bench 2>/dev/null
for i in $(seq 1 12); do
  rows=$((125 * scale * i * i))
  pg_psql -d bench <<SQL
create table mixed_$i as
select g as id, (random() * 1e6)::int as a, md5(g::text) || substr(md5(random()::text), 1, $i) as b,
       timestamptz '2026-01-01' + (g || ' minutes')::interval as c
from generate_series(1, $rows) g;
alter table mixed_$i add primary key (id);
create index on mixed_$i (a);
create index on mixed_$i (b);
SQL
done
pg_psql -d bench -c "vacuum analyze"
db_size=$(pg_psql -d bench -tA -c "select pg_database_size('bench')")
eval "$pg_dump_cmd" > "$work/dump.pgdump"
"$lifeboat" backup --policy "$work/fs.toml" 2>/dev/null
sed -e "s|^url = \"file://$work/repo\"|url = \"s3://bench/lifeboat\"\nendpoint = \"$endpoint\"\ndownload_streams = 1|" "$work/fs.toml" > "$work/s3-one.toml"
aws s3 sync --quiet "$work/repo" s3://bench/lifeboat
mkdir -p "$work/spool"
restore_commands

echo "== measuring ($runs runs each)" >&2
eval "$fresh" >/dev/null
measure "pg_restore -j2 from a local file (many tables)" "$restore -j2 '$work/dump.pgdump'" "$drop; $fresh >/dev/null"
measure "pg_restore from stdin (one job; many tables)" "$restore < '$work/dump.pgdump'" "$drop; $fresh >/dev/null"
# lifeboat restores into the same empty database pg_restore -d was given.
measure "lifeboat restore --jobs 2 (many tables)" "'$lifeboat' restore --policy '$work/fs.toml' --source bench --to $target --jobs 2 --spool-dir '$work'" "$drop; $fresh >/dev/null"
measure "lifeboat restore --jobs 2 from S3 (moto; many tables)" "'$lifeboat' restore --policy '$work/s3-one.toml' --source bench --to $target --jobs 2 --spool-dir '$work/spool' && [ -z \"\$(ls -A '$work/spool')\" ]" "$drop; $fresh >/dev/null"
measure "lifeboat restore (streamed, one job; many tables)" "'$lifeboat' restore --policy '$work/fs.toml' --source bench --to $target" "$drop; $fresh >/dev/null"
summarize "pg_restore -j2 from a local file (many tables)" pg_restore_jobs \
  "restore with jobs of a database of 17 tables (pgbench at scale $scale, the events table, 12 tables of mixed sizes; $(du -m "$work/dump.pgdump" | cut -f1) MiB dump; 2–3 indexes each)"
