#!/usr/bin/env bash
# PostgreSQL restore and verification benchmark, in one run on a throwaway local server:
#   pg_restore -j2 from a local plain dump file          the baseline
#   pg_restore (one job) from the same file, streamed through stdin
#   lifeboat restore --jobs 2 (the table loaded from the stored object, its indexes built 2 at a time)
#   lifeboat restore --jobs 1 (streamed)
#   lifeboat restore --jobs 1 (streamed) from a local S3 (moto), the same backup copied there,
#     in 4 MiB ranges 4 at a time (the default on S3) and in one GET (download_streams = 1)
#   lifeboat-verifier verify (spool + ephemeral cluster + restore + fingerprint comparison)
# The table has its primary key and two more indexes (a timestamp and a text column), so that a
# restore builds indexes as real databases make it do.
# Usage: bench/pg_restore.sh [ROWS]   (default 5500000 rows ≈ 1 GB; RUNS=3)
. "$(dirname "$0")/lib.sh"
bench_setup "${1:-5500000}" s3
pg_psql -d bench -c "create index on events (ts)" -c "create index on events (h)"
eval "$pg_dump_cmd" > "$work/dump.pgdump"
"$lifeboat" backup --policy "$work/fs.toml" 2>/dev/null
sed -e "s|^url = \"file://$work/repo\"|url = \"s3://bench/lifeboat\"\nendpoint = \"$endpoint\"|" "$work/fs.toml" > "$work/s3.toml"
aws s3 sync --quiet "$work/repo" s3://bench/lifeboat
sed -e "s|^endpoint = .*|&\ndownload_streams = 1|" "$work/s3.toml" > "$work/s3-one.toml"
restore_commands

echo "== measuring ($runs runs each)" >&2
eval "$fresh" >/dev/null
measure "pg_restore -j2 from a local file" "$restore -j2 '$work/dump.pgdump'" "$drop; $fresh >/dev/null"
measure "pg_restore from stdin (one job)" "$restore < '$work/dump.pgdump'" "$drop; $fresh >/dev/null"
# lifeboat restores into the same empty database pg_restore -d was given.
measure "lifeboat restore --jobs 2" "'$lifeboat' restore --policy '$work/fs.toml' --source bench --to $target --jobs 2 --spool-dir '$work'" "$drop; $fresh >/dev/null"
measure "lifeboat restore (streamed, one job)" "'$lifeboat' restore --policy '$work/fs.toml' --source bench --to $target" "$drop; $fresh >/dev/null"
measure "lifeboat restore from S3 (moto; streamed, one job; 4 ranged GETs at once)" "'$lifeboat' restore --policy '$work/s3.toml' --source bench --to $target" "$drop; $fresh >/dev/null"
measure "lifeboat restore from S3 (moto; streamed, one job; one GET)" "'$lifeboat' restore --policy '$work/s3-one.toml' --source bench --to $target" "$drop; $fresh >/dev/null"
measure "lifeboat-verifier verify" "'$verifier' verify --policy '$work/fs.toml' --source bench" "rm -rf '$work/repo/verifications'"
summarize "pg_restore -j2 from a local file" pg_restore \
  "restore of the benchmark backup ($(du -m "$work/dump.pgdump" | cut -f1) MiB dump; the table has three indexes)"
