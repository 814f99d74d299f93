#!/usr/bin/env bash
# Finding a backup among thousands, in one run on a throwaway local S3 (moto) and redis-server:
#   one real backup of a Redis source, then its manifest published under N-1 more ids, 15 minutes
#   apart (a source on a 15-minute schedule keeps ~3,000 over 30 days). Then:
#     aws s3 ls --recursive backups/          one listing of the same keys: the baseline
#     lifeboat list                           without the catalog cache: every manifest read
#     lifeboat list                           through the cache the agent keeps (state/<source>/)
#     lifeboat restore --dry-run              the plan of a restore of the latest
#     lifeboat prune --dry-run                retention over every backup
# Usage: bench/catalog.sh [N]   (default 3000; RUNS=3)
. "$(dirname "$0")/lib.sh"
n=${1:-3000}
scripts/install-deps.sh
command -v /usr/bin/time >/dev/null 2>&1 || apt-get install -y -qq time >/dev/null
[ -x "$venv/bin/aws" ] || "$venv/bin/pip" install -q --disable-pip-version-check awscli
# LIFEBOAT_BIN: another build to measure (the release build of this tree by default).
[ -n "${LIFEBOAT_BIN:-}" ] || cargo build --release --quiet --bins
lifeboat=${LIFEBOAT_BIN:-$root/target/release/lifeboat}
rm -rf "$work" && mkdir -p "$work"
. scripts/lib/throwaway-redis.sh
redis_start
moto_start
trap 'kill $moto_pid 2>/dev/null; redis_stop' EXIT
aws s3 mb s3://repo >/dev/null
redis-cli -p "$REDIS_PORT" DEBUG POPULATE 1000 key 100 >/dev/null 2>&1 \
  || redis-cli -p "$REDIS_PORT" SET key 1 >/dev/null
"$lifeboat" keygen > "$work/key.txt" 2>/dev/null
recipient=$(sed -n 's/^# public key: //p' "$work/key.txt")
cat > "$work/policy.toml" <<TOML
[repository]
url = "s3://repo/lb"
endpoint = "$endpoint"
[encryption]
recipients = ["$recipient"]
[defaults]
retention = { keep_last = 1000000 }
[[sources]]
name = "cache"
kind = "redis"
url = "redis://127.0.0.1:$REDIS_PORT"
TOML
"$lifeboat" backup --policy "$work/policy.toml" >/dev/null 2>"$work/err" || { cat "$work/err" >&2; exit 1; }
echo "== publishing $((n - 1)) more manifests" >&2
"$venv/bin/python" - "$endpoint" "$n" <<'PY'
import datetime, json, random, sys
from concurrent.futures import ThreadPoolExecutor
import boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1")
n = int(sys.argv[2])
keys = [o["Key"] for o in s3.list_objects_v2(Bucket="repo", Prefix="lb/backups/cache/")["Contents"]]
key = next(k for k in keys if k.endswith("/manifest.json"))
m = json.loads(s3.get_object(Bucket="repo", Key=key)["Body"].read())
first = datetime.datetime.strptime(m["id"][:16], "%Y%m%dT%H%M%SZ")
random.seed(1)
def put(i):
    at = first - datetime.timedelta(minutes=15 * i)
    mi = dict(m, id=at.strftime("%Y%m%dT%H%M%SZ") + "-" + "%06x" % random.getrandbits(24))
    for f in ("started_at", "finished_at"):
        if f in mi:
            mi[f] = at.strftime("%Y-%m-%dT%H:%M:%SZ")
    s3.put_object(Bucket="repo", Key=f"lb/backups/cache/{mi['id']}/manifest.json", Body=json.dumps(mi).encode())
with ThreadPoolExecutor(16) as pool:
    list(pool.map(put, range(1, n)))
PY
count=$("$lifeboat" list --policy "$work/policy.toml" --json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')
[ "$count" = "$n" ] || { echo "lifeboat list shows $count backups, not $n" >&2; exit 1; }
db_size=0
: > "$work/results.tsv"
echo "== measuring ($runs runs each)" >&2
measure "aws s3 ls --recursive (one listing)" "'$root/$venv/bin/aws' --endpoint-url $endpoint s3 ls --recursive s3://repo/lb/backups/ >/dev/null"
# Cold: without the catalog cache (deleted before each run), every manifest is read.
cache=s3://repo/lb/state/cache/catalog.json.zst
drop_cache="'$root/$venv/bin/aws' --endpoint-url $endpoint s3 rm --quiet $cache"
eval "$drop_cache"
measure "lifeboat list, no catalog cache (every manifest read)" "'$lifeboat' list --policy '$work/policy.toml' >/dev/null" "$drop_cache"
# Warm: the cache one listing wrote; the rows below read through it.
count=$("$lifeboat" list --policy "$work/policy.toml" --json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')
[ "$count" = "$n" ] || { echo "lifeboat list through the cache shows $count backups, not $n" >&2; exit 1; }
measure "lifeboat list" "'$lifeboat' list --policy '$work/policy.toml' >/dev/null"
measure "lifeboat restore --dry-run (the latest)" "'$lifeboat' restore --policy '$work/policy.toml' --source cache --to '$work/out.rdb' --dry-run >/dev/null"
measure "lifeboat prune --dry-run" "'$lifeboat' prune --policy '$work/policy.toml' --dry-run >/dev/null"
# The requests of one warm `lifeboat list`, by S3 billing class, from moto's request log.
before=$(wc -l < "$work/moto.log")
"$lifeboat" list --policy "$work/policy.toml" >/dev/null
requests=$(tail -n +"$((before + 1))" "$work/moto.log" | python3 -c '
import re, sys
n = {"LIST": 0, "GET": 0, "HEAD": 0, "PUT": 0}
for line in sys.stdin:
    m = re.search(r"\"(GET|HEAD|PUT|POST|DELETE) (\S+)", line)
    if not m:
        continue
    op, path = m.groups()
    op = "LIST" if op == "GET" and "list-type=" in path else op
    n[op] = n.get(op, 0) + 1
print(", ".join(f"{v} {k}" for k, v in n.items() if v))')
echo "   requests of one lifeboat list: $requests" >&2
summarize "aws s3 ls --recursive (one listing)" "catalog${BENCH_KIND_SUFFIX:-}" \
  "$n backups of one source in a local S3 (moto); one warm \`lifeboat list\` made $requests"
