#!/usr/bin/env bash
# PostgreSQL base backup benchmark (kind = "postgres-physical"), all in one run on throwaway local
# servers:
#   pg_basebackup -D - -Ft -X none > /dev/null     the server's own speed, no WAL
#   pg_basebackup -D - -Ft -X fetch > /dev/null    the same with the backup's WAL, as lifeboat takes it
#   pg_basebackup … | zstd -3 | age > file          the hand pipe
#   lifeboat backup → local directory, → S3 (moto)
# Usage: bench/pg_basebackup.sh [ROWS]   (default 5500000 rows ≈ 1 GB cluster; RUNS=3)
. "$(dirname "$0")/lib.sh"
bench_setup "${1:-5500000}" s3
sed -e 's|^kind = "postgres"|kind = "postgres-physical"\ncheckpoint = "fast"|' -e '/^globals = false/d' \
  "$work/fs.toml" > "$work/phys-fs.toml"
sed -e "s|^url = \"file://$work/repo\"|url = \"s3://bench/lifeboat\"\nendpoint = \"$endpoint\"|" \
  "$work/phys-fs.toml" > "$work/phys-s3.toml"
bb="'$PG_BIN/pg_basebackup' -h 127.0.0.1 -p $PG_PORT -U postgres -D - -Ft --checkpoint=fast"
cluster_size=$(pg_psql -d postgres -tA -c "select sum(pg_database_size(datname)) from pg_database")

echo "== measuring ($runs runs each)" >&2
measure "pg_basebackup -Ft -D - -X none > /dev/null" "$bb -X none"
measure "pg_basebackup -Ft -D - -X fetch > /dev/null" "$bb -X fetch"
measure "pg_basebackup -X fetch | zstd -3 | age > file (hand pipe)" \
  "$bb -X fetch | zstd -3 -q | age -r $recipient > '$work/hand.tar.zst.age'" "rm -f '$work/hand.tar.zst.age'"
measure "lifeboat backup → local directory" "'$lifeboat' backup --policy '$work/phys-fs.toml'" \
  "stored=\$('$lifeboat' list --policy '$work/phys-fs.toml' --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0][\"size_stored\"])'); rm -rf '$work/repo'"
measure "lifeboat backup → S3 (moto)" "'$lifeboat' backup --policy '$work/phys-s3.toml'" \
  "aws s3 rm --quiet --recursive s3://bench/lifeboat/backups/"
summarize "pg_basebackup -Ft -D - -X none > /dev/null" pg_basebackup \
  "cluster $((cluster_size / 1048576)) MiB, stored by lifeboat $((stored / 1048576)) MiB"
