#!/usr/bin/env bash
# Soak: the agent and the verifier daemon run for MINUTES against a PostgreSQL and a Redis that
# keep going down and coming back (stopped for 5–25 s at random every 20–60 s); with `s3`, the
# repository is an S3 server (moto) behind a proxy that goes down the same way (connections reset,
# new ones refused). Backups run every
# 20 s, verification every 30 s, the RPO is 2 minutes. Every 10 s the agent's /status is sampled:
# after a 2-minute warm-up, no source may ever be in breach of its RPO (newest *verified* backup
# older than 2 minutes). Prints the figures; exits 1 on any breach or if the agent died.
# Usage: scripts/soak.sh [MINUTES [fs|s3]]   (default 10 fs)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
minutes=${1:-10}
repo=${2:-fs}
case $repo in
  fs) scripts/install-deps.sh --no-s3 ;;
  s3) scripts/install-deps.sh ;;
  *) echo "usage: scripts/soak.sh [MINUTES [fs|s3]]" >&2; exit 2 ;;
esac
cargo build --quiet --bins
work=$(mktemp -d /tmp/lifeboat-soak.XXXXXX)
. scripts/lib/throwaway-pg.sh
. scripts/lib/throwaway-redis.sh
pg_start
redis_start
agent_pid=; verifier_pid=; moto_pid=; proxy_pid=
cleanup() { kill $agent_pid $verifier_pid $moto_pid $proxy_pid 2>/dev/null || true; pg_stop; redis_stop; rm -rf "$work"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
repository="url = \"file://$work/repo\""
if [ "$repo" = s3 ]; then
  venv=${MOTO_VENV:-target/moto-venv}
  moto_port=$(free_port); proxy_port=$(free_port)
  "$venv/bin/moto_server" -H 127.0.0.1 -p "$moto_port" >"$work/moto.log" 2>&1 &
  moto_pid=$!
  python3 scripts/lib/flaky-proxy.py "$proxy_port" "$moto_port" &
  proxy_pid=$!
  export AWS_ACCESS_KEY_ID=soak AWS_SECRET_ACCESS_KEY=soak AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true
  aws=$venv/bin/aws
  for _ in $(seq 1 100); do "$aws" --endpoint-url "http://127.0.0.1:$moto_port" s3 ls >/dev/null 2>&1 && break; sleep 0.2; done
  "$aws" --endpoint-url "http://127.0.0.1:$moto_port" s3 mb s3://soak >/dev/null
  repository="url = \"s3://soak/repo\"
endpoint = \"http://127.0.0.1:$proxy_port\""
fi
pg_psql -d postgres -c "create database app" >/dev/null
pg_psql -d app -c "create table t as select g, md5(g::text) from generate_series(1, 20000) g" >/dev/null
redis-cli -p "$REDIS_PORT" DEBUG POPULATE 20000 >/dev/null 2>&1 || \
  for i in $(seq 1 2000); do echo "SET k$i v$i"; done | redis-cli -p "$REDIS_PORT" >/dev/null
target/debug/lifeboat keygen > "$work/key.txt" 2>/dev/null
recipient=$(sed -n 's/^# public key: //p' "$work/key.txt")
port=$(free_port)
cat > "$work/policy.toml" <<TOML
[repository]
$repository
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
    what=$(( RANDOM % $([ "$repo" = s3 ] && echo 3 || echo 2) ))
    if [ "$what" -eq 0 ]; then
      echo "== PostgreSQL down for ${down}s" >&2; pg_pause; sleep "$down"; pg_resume
    elif [ "$what" -eq 2 ]; then
      echo "== S3 down for ${down}s" >&2; kill -USR1 "$proxy_pid"; sleep "$down"; kill -USR2 "$proxy_pid"
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
echo "soak: ${minutes} min, repository ${repo}, ${outages} outages, ${samples} status samples after warm-up, ${breaches} with an RPO breach; backups kept/verified now: ${backups}; error lines in the agent log: ${failed}"
[ "$breaches" -eq 0 ]
