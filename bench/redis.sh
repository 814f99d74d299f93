#!/usr/bin/env bash
# Redis capture benchmark, in one run on a throwaway local redis-server:
#   redis-cli --rdb FILE                    the reference: the same replication capture, no compression
#   lifeboat backup → local directory       capture + RDB checks + zstd + age + store
#   lifeboat backup (scan) → local directory  mode = "scan": SCAN + DUMP + PTTL written as an RDB file
# Dataset: KEYS string keys (DEBUG POPULATE, 100-byte values) plus 5% hashes of random hex.
# Usage: bench/redis.sh [KEYS]   (default 1000000; RUNS=3)
. "$(dirname "$0")/lib.sh"
keys=${1:-1000000}
scripts/install-deps.sh --no-s3
command -v /usr/bin/time >/dev/null 2>&1 || apt-get install -y -qq time >/dev/null
cargo build --release --quiet --bins
lifeboat=$root/target/release/lifeboat
rm -rf "$work" && mkdir -p "$work"
. scripts/lib/throwaway-redis.sh
redis_start --enable-debug-command yes
trap redis_stop EXIT
echo "== loading $keys keys" >&2
redis-cli -p "$REDIS_PORT" DEBUG POPULATE "$keys" key 100 >/dev/null
python3 - "$((keys / 20))" <<'PY' | redis-cli -p "$REDIS_PORT" --pipe >/dev/null
import os, sys
for i in range(int(sys.argv[1])):
    fields = []
    for f in range(5):
        v = os.urandom(16).hex()
        fields += [f"f{f}", v]
    args = ["HSET", f"h:{i}"] + fields
    sys.stdout.write(f"*{len(args)}\r\n" + "".join(f"${len(a)}\r\n{a}\r\n" for a in args))
PY
"$lifeboat" keygen > "$work/key.txt" 2>/dev/null
recipient=$(sed -n 's/^# public key: //p' "$work/key.txt")
cat > "$work/redis.toml" <<TOML
[repository]
url = "file://$work/repo"
[encryption]
recipients = ["$recipient"]
[defaults]
retention = { keep_last = 1 }
[[sources]]
name = "cache"
kind = "redis"
url = "redis://127.0.0.1:$REDIS_PORT"
TOML
# The same source read with SCAN + DUMP (mode = "scan", for managed services), unthrottled.
sed -e 's/^kind = "redis"$/kind = "redis"\nmode = "scan"\nscan_rate = 100000000/' \
  -e "s|file://$work/repo|file://$work/repo-scan|" "$work/redis.toml" > "$work/redis-scan.toml"
redis-cli -p "$REDIS_PORT" --rdb "$work/dump.rdb" >/dev/null 2>&1
db_size=$(stat -c %s "$work/dump.rdb")
: > "$work/results.tsv"
echo "== measuring ($runs runs each)" >&2
measure "redis-cli --rdb FILE" "redis-cli -p $REDIS_PORT --rdb '$work/dump.rdb'" "rm -f '$work/dump.rdb'"
measure "lifeboat backup → local directory" "'$lifeboat' backup --policy '$work/redis.toml'" \
  "stored=\$(du -sb '$work/repo/backups' | cut -f1); rm -rf '$work/repo'"
measure "lifeboat backup (scan) → local directory" "'$lifeboat' backup --policy '$work/redis-scan.toml'" \
  "rm -rf '$work/repo-scan'"
summarize "redis-cli --rdb FILE" redis \
  "Redis 7, $(redis-cli -p "$REDIS_PORT" DBSIZE) keys, RDB $((db_size / 1048576)) MiB, stored by lifeboat $((stored / 1048576)) MiB"
