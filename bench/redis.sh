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

# A 3-shard Redis Cluster, KEYS keys per shard: lifeboat's one backup of every shard (3 captured
# at a time) against three `redis-cli --rdb` run in parallel, the same replication capture.
echo "== a 3-shard Redis Cluster, $keys keys per shard" >&2
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
cluster_ports=() cluster_dirs=() cluster_bus=()
cluster_stop() {
  local d pid
  for d in "${cluster_dirs[@]}"; do
    pid=$(cat "$d/pid" 2>/dev/null || true)
    if [ -n "$pid" ]; then
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
    fi
    rm -rf "$d"
  done
}
trap 'redis_stop; cluster_stop' EXIT
for i in 0 1 2; do
  d=$(mktemp -d /tmp/lifeboat-rcluster.XXXXXX) p=$(free_port) b=$(free_port)
  redis-server --port "$p" --cluster-port "$b" --bind 127.0.0.1 --dir "$d" --save '' --appendonly no \
    --daemonize yes --pidfile "$d/pid" --logfile "$d/log" --repl-diskless-sync-delay 0 \
    --cluster-enabled yes --enable-debug-command yes
  cluster_ports+=("$p") cluster_dirs+=("$d") cluster_bus+=("$b")
done
for p in "${cluster_ports[@]}"; do
  for _ in $(seq 100); do redis-cli -p "$p" ping >/dev/null 2>&1 && break; sleep 0.05; done
done
redis-cli -p "${cluster_ports[0]}" CLUSTER ADDSLOTSRANGE 0 5460 >/dev/null
redis-cli -p "${cluster_ports[1]}" CLUSTER ADDSLOTSRANGE 5461 10921 >/dev/null
redis-cli -p "${cluster_ports[2]}" CLUSTER ADDSLOTSRANGE 10922 16383 >/dev/null
for i in 1 2; do
  redis-cli -p "${cluster_ports[0]}" CLUSTER MEET 127.0.0.1 "${cluster_ports[$i]}" "${cluster_bus[$i]}" >/dev/null
done
for p in "${cluster_ports[@]}"; do
  for _ in $(seq 300); do
    redis-cli -p "$p" CLUSTER INFO | grep -q '^cluster_state:ok' && break
    sleep 0.1
  done
  redis-cli -p "$p" CLUSTER INFO | grep -q '^cluster_state:ok' || { echo "the benchmark cluster did not form" >&2; exit 1; }
done
for i in 0 1 2; do
  redis-cli -p "${cluster_ports[$i]}" DEBUG POPULATE "$keys" "s$i:key" 100 >/dev/null
done
sed -e "s|^url = \"redis://.*|url = \"redis+cluster://127.0.0.1:${cluster_ports[0]},127.0.0.1:${cluster_ports[1]}\"|" \
  -e "s|file://$work/repo|file://$work/repo-cluster|" "$work/redis.toml" > "$work/cluster.toml"
rdb_each() {
  local i
  for i in 0 1 2; do printf "redis-cli -p %s --rdb '%s/shard-%s.rdb' & p%s=\$!; " "${cluster_ports[$i]}" "$work" "$i" "$i"; done
  printf 'wait $p0 && wait $p1 && wait $p2'
}
eval "$(rdb_each)" >/dev/null 2>&1
db_size=$(cat "$work"/shard-*.rdb | wc -c)
: > "$work/results.tsv"
measure "3 × redis-cli --rdb, in parallel" "$(rdb_each)" "rm -f '$work'/shard-*.rdb"
measure "lifeboat backup (3-shard cluster) → local directory" "'$lifeboat' backup --policy '$work/cluster.toml'" \
  "rm -rf '$work/repo-cluster'"
summarize "3 × redis-cli --rdb, in parallel" redis_cluster \
  "Redis 7 cluster, 3 shards × $keys keys, RDB $((db_size / 1048576)) MiB in all"
