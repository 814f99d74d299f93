#!/usr/bin/env bash
# The main job on the embedded default: a throwaway PostgreSQL and a throwaway Redis with sample
# data are backed up into ./lifeboat-repo (a local directory repository), listed, checked,
# verified by a restore into a scratch cluster / scratch redis-server, and restored once more with
# stock tools only.
# Installs what is missing; leaves ./lifeboat-repo and the keys in ./lifeboat-demo/ behind to explore.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

scripts/install-deps.sh --no-s3
cargo build --quiet --bins
lifeboat="$root/target/debug/lifeboat"

. scripts/lib/throwaway-pg.sh
. scripts/lib/throwaway-redis.sh
pg_start
trap 'pg_stop; redis_stop' EXIT
echo "== started a throwaway PostgreSQL on 127.0.0.1:$PG_PORT"
redis_start
echo "== started a throwaway Redis on 127.0.0.1:$REDIS_PORT"
for i in $(seq 1 2000); do echo "SET user:$i name-$i"; done | redis-cli -p "$REDIS_PORT" >/dev/null
redis-cli -p "$REDIS_PORT" RPUSH queue a b c >/dev/null
redis-cli -p "$REDIS_PORT" XADD events '*' kind signup >/dev/null
redis-cli -p "$REDIS_PORT" SET session:1 token EX 3600 >/dev/null
psql() { pg_psql "$@"; }
psql -d postgres -c "create database app"
psql -d app <<'SQL'
create table customers (id serial primary key, name text not null, email text, created timestamptz default now());
create table orders (id bigserial primary key, customer_id int references customers(id), total numeric(12,2), items jsonb);
insert into customers (name, email) select 'customer ' || g, 'c' || g || '@example.com' from generate_series(1, 5000) g;
insert into orders (customer_id, total, items)
  select 1 + g % 5000, (g % 997) * 1.25, jsonb_build_object('sku', 'S' || g % 113, 'qty', 1 + g % 5)
  from generate_series(1, 50000) g;
SQL

mkdir -p lifeboat-demo
if [ ! -s lifeboat-demo/key.txt ]; then
  echo "== making an age key: lifeboat-demo/key.txt"
  "$lifeboat" keygen > lifeboat-demo/key.txt
fi
if [ ! -s lifeboat-demo/signing.key ]; then
  echo "== making a signing key: lifeboat-demo/signing.key"
  "$lifeboat" keygen --signing > lifeboat-demo/signing.key 2>/dev/null
fi
export LIFEBOAT_RECIPIENT=$(sed -n 's/^# public key: //p' lifeboat-demo/key.txt)
export LIFEBOAT_SIGNING_KEY_FILE=$root/lifeboat-demo/signing.key
export LIFEBOAT_SIGNING_PUBLIC_KEY=$(sed -n '1s/.*public key //p' lifeboat-demo/signing.key)
export LIFEBOAT_IDENTITY_FILE=$root/lifeboat-demo/key.txt
export LIFEBOAT_DEV_PG_URL="postgres://postgres@127.0.0.1:$PG_PORT/app"
export LIFEBOAT_DEV_REDIS_URL="redis://127.0.0.1:$REDIS_PORT"

echo "== lifeboat policy check policies/dev.toml"
"$lifeboat" policy check policies/dev.toml
echo "== lifeboat backup --policy policies/dev.toml (app-db: pg_dump of a snapshot; cache: Redis as a replica)"
"$lifeboat" backup --policy policies/dev.toml
echo "== lifeboat list --policy policies/dev.toml"
"$lifeboat" list --policy policies/dev.toml
echo "== lifeboat check --policy policies/dev.toml --read-data"
"$lifeboat" check --policy policies/dev.toml --read-data

echo "== lifeboat-verifier verify --policy policies/dev.toml (restores into a throwaway cluster / redis-server and compares)"
"$root/target/debug/lifeboat-verifier" verify --policy policies/dev.toml
"$lifeboat" list --policy policies/dev.toml

latest=$("$lifeboat" list --policy policies/dev.toml --source app-db --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["id"])')
object=lifeboat-repo/backups/app-db/$latest/database.dump.zst.age
echo "== checking the manifest's signature with stock minisign"
minisign -V -P "$LIFEBOAT_SIGNING_PUBLIC_KEY" -m "lifeboat-repo/backups/app-db/$latest/manifest.json"
echo "== restoring $object with stock tools only (age | zstd | pg_restore) into database restored"
psql -d postgres -c "create database restored"
age -d -i lifeboat-demo/key.txt "$object" | zstd -d -q | "$PG_BIN/pg_restore" --exit-on-error -h 127.0.0.1 -p "$PG_PORT" -U postgres -d restored
for db in app restored; do
  echo "$db: $(psql -d "$db" -tA -c "select (select count(*) from customers) || ' customers, ' || count(*) || ' orders, digest of orders ' || md5(string_agg(o::text, ',' order by id)) from orders o")"
done
cache=$("$lifeboat" list --policy policies/dev.toml --source cache --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["id"])')
echo "== restoring the Redis snapshot with stock tools only (age | zstd > dump.rdb | redis-check-rdb)"
age -d -i lifeboat-demo/key.txt "lifeboat-repo/backups/cache/$cache/dump.rdb.zst.age" | zstd -d -q > "$REDIS_WORK/restored.rdb"
redis-check-rdb "$REDIS_WORK/restored.rdb" | grep -E "keys read|expires"
echo "cache: $(redis-cli -p "$REDIS_PORT" DBSIZE) keys in the live server"
echo "== done: backups are in ./lifeboat-repo, the keys in ./lifeboat-demo/ (key.txt, signing.key)"
