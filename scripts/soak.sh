#!/usr/bin/env bash
# Soak: the agent and the verifier daemon run for MINUTES against a PostgreSQL and a Redis that
# keep going down and coming back (stopped for 5–25 s at random every 20–60 s). Backups run every
# 20 s, verification every 30 s, the RPO is 2 minutes. Every 10 s the agent's /status is sampled:
# after a 2-minute warm-up, no source may ever be in breach of its RPO (newest *verified* backup
# older than 2 minutes). Prints the figures; exits 1 on any breach or if the agent died.
# Usage: scripts/soak.sh [MINUTES]   (default 10)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
minutes=${1:-10}
scripts/install-deps.sh --no-s3
cargo build --quiet --bins
work=$(mktemp -d /tmp/lifeboat-soak.XXXXXX)
. scripts/lib/throwaway-pg.sh
. scripts/lib/throwaway-redis.sh
pg_start
redis_start
agent_pid=; verifier_pid=
cleanup() { kill $agent_pid $verifier_pid 2>/dev/null || true; pg_stop; redis_stop; rm -rf "$work"; }
trap cleanup EXIT
pg_psql -d postgres -c "create database app" >/dev/null
pg_psql -d app -c "create table t as select g, md5(g::text) from generate_series(1, 20000) g" >/dev/null
redis-cli -p "$REDIS_PORT" DEBUG POPULATE 20000 >/dev/null 2>&1 || \
  for i in $(seq 1 2000); do echo "SET k$i v$i"; done | redis-cli -p "$REDIS_PORT" >/dev/null
target/debug/lifeboat keygen > "$work/key.txt" 2>/dev/null
recipient=$(sed -n 's/^# public key: //p' "$work/key.txt")
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat > "$work/policy.toml" <<TOML
[repository]
url = "file://$work/repo"
[encryption]
recipients = ["$recipient"]
identity_file = "$work/key.txt"
[agent]
listen = "127.0.0.1:$port"
log_format = "json"
max_concurrent = 2
[defaults]
schedule = "*/20 * * * * *"
timeout = "60s"
retention = { keep_last = 6 }
objectives = { rpo = "2m" }
[[sources]]
name = "app-db"
kind = "postgres"
url = "postgres://postgres@127.0.0.1:$PG_PORT/app"
retries = 1
[sources.verify]
schedule = "*/30 * * * * *"
[[sources]]
name = "cache"
kind = "redis"
url = "redis://127.0.0.1:$REDIS_PORT"
retries = 1
[sources.verify]
schedule = "*/30 * * * * *"
TOML
target/debug/lifeboat agent --policy "$work/policy.toml" 2>"$work/agent.log" &
agent_pid=$!
target/debug/lifeboat-verifier run --policy "$work/policy.toml" 2>"$work/verifier.log" &
verifier_pid=$!

end=$(( $(date +%s) + minutes * 60 ))
warm=$(( $(date +%s) + 120 ))
next_flap=$(( $(date +%s) + 30 ))
samples=0; breaches=0; outages=0
while [ "$(date +%s)" -lt "$end" ]; do
  now=$(date +%s)
  if [ "$now" -ge "$next_flap" ]; then
    down=$(( 5 + RANDOM % 21 ))
    if [ $(( RANDOM % 2 )) -eq 0 ]; then
      echo "== PostgreSQL down for ${down}s" >&2; pg_pause; sleep "$down"; pg_resume
    else
      echo "== Redis down for ${down}s" >&2; redis_pause; sleep "$down"; redis_start >/dev/null
      redis-cli -p "$REDIS_PORT" DEBUG POPULATE 20000 >/dev/null 2>&1 || redis-cli -p "$REDIS_PORT" SET k 1 >/dev/null
    fi
    outages=$((outages + 1))
    next_flap=$(( $(date +%s) + 20 + RANDOM % 41 ))
    continue
  fi
  kill -0 "$agent_pid" 2>/dev/null || { echo "the agent died:" >&2; tail -20 "$work/agent.log" >&2; exit 1; }
  status=$(curl -sf "http://127.0.0.1:$port/status" || echo '{}')
  if [ "$now" -ge "$warm" ]; then
    samples=$((samples + 1))
    b=$(python3 -c 'import json,sys; d=json.loads(sys.argv[1]); s=d.get("sources", d); print(sum(1 for v in (s.values() if isinstance(s, dict) else s) if v.get("breaches")))' "$status" 2>/dev/null || echo 1)
    if [ "$b" != 0 ]; then
      breaches=$((breaches + 1))
      echo "breach at $(date -u +%T): $status" >&2
    fi
  fi
  sleep 10
done
backups=$(target/debug/lifeboat list --policy "$work/policy.toml" --json | python3 -c 'import json,sys; l=json.load(sys.stdin); print(len(l), sum(1 for b in l if b["verified"]))')
failed=$(grep -c '"result":"failure"\|Backup failed\|"level":"ERROR"' "$work/agent.log" || true)
echo "soak: ${minutes} min, ${outages} outages, ${samples} status samples after warm-up, ${breaches} with an RPO breach; backups kept/verified now: ${backups}; error lines in the agent log: ${failed}"
[ "$breaches" -eq 0 ]
