#!/usr/bin/env bash
# PostgreSQL backup benchmark, all in one run on throwaway local servers:
#   pg_dump -Fc -Z0 > /dev/null              the source's own speed
#   zstd -3 (1 and 2 threads) over the dump  the compression stage alone
#   pg_dump | zstd -3 | age | aws s3 cp -    the hand pipe into a local S3 (moto)
#   pg_dump | gzip > file; aws s3 cp file    the seed-style script
#   pg_dump | restic backup --stdin          restic into a local repository
#   lifeboat backup → S3 (moto), → local directory
# then, on its own table: one row of a 64 MiB bytea and a 64 MiB text value, lifeboat's own peak RSS
# Usage: bench/pg_backup.sh [ROWS]   (default 5500000 rows ≈ 1 GB of realistic table data; RUNS=3)
. "$(dirname "$0")/lib.sh"
bench_setup "${1:-5500000}" s3
sed -e "s|^url = \"file://$work/repo\"|url = \"s3://bench/lifeboat\"\nendpoint = \"$endpoint\"|" "$work/fs.toml" > "$work/s3.toml"
eval "$pg_dump_cmd" > "$work/dump.pgdump"
command -v restic >/dev/null 2>&1 || apt-get install -y -qq restic >/dev/null
export RESTIC_PASSWORD=bench-only-password
restic -q -r "$work/restic" init
dump_size=$(stat -c %s "$work/dump.pgdump")

echo "== measuring ($runs runs each)" >&2
measure "pg_dump -Fc -Z0 > /dev/null" "$pg_dump_cmd"
measure "zstd -3 (1 thread) over the dump" "zstd -3 -q -c '$work/dump.pgdump'"
measure "zstd -3 -T2 over the dump" "zstd -3 -T2 -q -c '$work/dump.pgdump'"
measure "pg_dump | zstd -3 | age | aws s3 cp - (hand pipe)" \
  "$pg_dump_cmd | zstd -3 -q | age -r $recipient | '$root/$venv/bin/aws' --endpoint-url $endpoint s3 cp - s3://bench/hand/dump.zst.age" \
  "aws s3 rm --quiet --recursive s3://bench/hand/"
measure "seed script: pg_dump | gzip > file; aws s3 cp file" \
  "$pg_dump_cmd | gzip > '$work/seed.gz' && '$root/$venv/bin/aws' --endpoint-url $endpoint s3 cp --quiet '$work/seed.gz' s3://bench/seed/dump.gz" \
  "rm -f '$work/seed.gz'; aws s3 rm --quiet --recursive s3://bench/seed/"
measure "restic backup --stdin (local repository)" \
  "$pg_dump_cmd | restic -q -r '$work/restic' backup --stdin --stdin-filename bench.pgdump" \
  "rm -rf '$work/restic'; restic -q -r '$work/restic' init"
measure "lifeboat backup → S3 (moto)" "'$lifeboat' backup --policy '$work/s3.toml'" \
  "stored=\$('$lifeboat' list --policy '$work/s3.toml' --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0][\"size_stored\"])'); aws s3 rm --quiet --recursive s3://bench/lifeboat/backups/"
measure "lifeboat backup → local directory" "'$lifeboat' backup --policy '$work/fs.toml'" "rm -rf '$work/repo'"
summarize "pg_dump -Fc -Z0 > /dev/null" pg_backup \
  "pg_dump -Fc -Z0 $((dump_size / 1048576)) MiB, stored by lifeboat $((stored / 1048576)) MiB"

# Memory must not follow the largest row: one row with a 64 MiB bytea and a 64 MiB text value.
echo "== one row of 128 MiB" >&2
: > "$work/results.tsv"
pg_psql -d postgres -c "create database bigrow" > /dev/null
pg_psql -d bigrow -c "create table big (b bytea, t text); insert into big select convert_to(repeat('x', 64 << 20), 'UTF8'), repeat('y', 64 << 20)" > /dev/null
sed -e "s|/bench\"$|/bigrow\"|" "$work/fs.toml" > "$work/bigrow.toml"
measure "pg_dump -Fc -Z0 > /dev/null (one 128 MiB row)" "${pg_dump_cmd% bench} bigrow"
# GNU time's peak RSS counts pg_dump, which holds the row (~400 MiB): lifeboat's own is polled.
measure_own "lifeboat backup → local directory (one 128 MiB row; lifeboat's own RSS)" \
  "'$lifeboat' backup --policy '$work/bigrow.toml'" "rm -rf '$work/repo'"
summarize "pg_dump -Fc -Z0 > /dev/null (one 128 MiB row)" pg_backup_bigrow \
  "one row: a 64 MiB bytea and a 64 MiB text value"
