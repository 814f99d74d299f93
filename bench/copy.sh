#!/usr/bin/env bash
# Copy benchmark: the ~1 GB PostgreSQL backup copied from one S3 server (moto) to another, in one
# run on throwaway local servers:
#   aws s3 cp s3://a/KEY - | aws s3 cp - s3://b/KEY, per object of the backup
#                                            (the plain tools: the CLI copies between buckets of
#                                            one endpoint only, so two servers need a pipe)
#   lifeboat copy                            stored bytes as they are, each object hashed as read
#                                            and checked against its manifest, read back at the
#                                            copy and hashed again, the manifest last
# The copy's wall time right after a backup is the copy's lag: the agent starts the same
# catch-up as soon as it publishes a backup.
# Usage: bench/copy.sh [ROWS]   (default 5500000 rows ≈ 1 GB of realistic table data; RUNS=3)
. "$(dirname "$0")/lib.sh"
bench_setup "${1:-5500000}" s3
port2=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$venv/bin/moto_server" -H 127.0.0.1 -p "$port2" >"$work/moto2.log" 2>&1 &
moto2_pid=$!
trap 'kill $moto2_pid 2>/dev/null; bench_cleanup' EXIT
endpoint2=http://127.0.0.1:$port2
aws2() { "$root/$venv/bin/aws" --endpoint-url "$endpoint2" "$@"; }
for _ in $(seq 1 100); do aws2 s3 ls >/dev/null 2>&1 && break; sleep 0.2; done
aws2 s3 mb s3://dr-bench >/dev/null
sed -e "s|^url = \"file://$work/repo\"|url = \"s3://bench/lifeboat\"\nendpoint = \"$endpoint\"|" "$work/fs.toml" > "$work/s3.toml"
cat >> "$work/s3.toml" <<TOML

[[copies]]
name = "dr"
url = "s3://dr-bench/lifeboat"
endpoint = "$endpoint2"
TOML
"$lifeboat" backup --policy "$work/s3.toml" >/dev/null 2>&1
keys=$(aws s3 ls --recursive s3://bench/lifeboat/backups/ | awk '{print $4}')
stored=$(aws s3 ls --recursive --summarize s3://bench/lifeboat/backups/ | awk '/Total Size/ {print $3}')

echo "== measuring ($runs runs each)" >&2
hand="set -e; for k in $(echo $keys); do '$root/$venv/bin/aws' --endpoint-url $endpoint s3 cp --quiet s3://bench/\$k - | '$root/$venv/bin/aws' --endpoint-url $endpoint2 s3 cp --quiet - s3://dr-bench/hand/\$k; done"
measure "aws s3 cp from server A to stdout, into server B (per object)" "$hand" \
  "aws2 s3 rm --quiet --recursive s3://dr-bench/hand/"
measure "lifeboat copy" "'$lifeboat' copy --policy '$work/s3.toml'" \
  "aws2 s3 rm --quiet --recursive s3://dr-bench/lifeboat/"
summarize "aws s3 cp from server A to stdout, into server B (per object)" copy \
  "one PostgreSQL backup ($((stored / 1048576)) MiB stored) from one local S3 server (moto) to another"

# The copy's lag under a steady load: the agent backs up every LAG_EVERY seconds for LAG_SECONDS
# and copies each backup as it publishes it; each backup's lag is from its end (the manifest's
# finished_at) to its manifest's time at the copy (LastModified, to the second).
[ "${COPY_LAG:-1}" = 1 ] || exit 0
every=${LAG_EVERY:-15}
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
{
  printf '[agent]\nlisten = "127.0.0.1:%s"\n\n' "$port"
  sed -e "s|^name = \"bench\"|name = \"bench\"\nschedule = \"*/$every * * * * *\"\nretention = { keep_last = 100 }|" "$work/s3.toml"
} > "$work/agent.toml"
aws s3 rm --quiet --recursive s3://bench/lifeboat/
aws2 s3 rm --quiet --recursive s3://dr-bench/lifeboat/
echo "== the copy's lag: the agent backs up every ${every} s for ${LAG_SECONDS:-120} s" >&2
"$lifeboat" agent --policy "$work/agent.toml" 2>"$work/agent.log" &
agent_pid=$!
sleep "${LAG_SECONDS:-120}"
kill -TERM "$agent_pid"
wait "$agent_pid" || true
: > "$work/results.tsv"
"$lifeboat" list --policy "$work/s3.toml" --json > "$work/list.json"
aws2 s3api list-objects-v2 --bucket dr-bench --prefix lifeboat/backups/ > "$work/copied.json"
python3 - "$work/list.json" "$work/copied.json" "$work/results.tsv" "$every" <<'PY'
import datetime, json, sys
backups, copied, out, every = json.load(open(sys.argv[1])), json.load(open(sys.argv[2])), sys.argv[3], sys.argv[4]
at = {o["Key"]: o["LastModified"] for o in copied.get("Contents", [])}
t = lambda s: datetime.datetime.fromisoformat(s.replace("Z", "+00:00"))
with open(out, "a") as f:
    for i, b in enumerate(sorted(backups, key=lambda b: b["finished_at"])):
        key = f"lifeboat/backups/bench/{b['id']}/manifest.json"
        if key not in at:
            print(f"   backup {b['id']} never reached the copy", file=sys.stderr)
            continue
        # To the second: a copy within the same second counts as 0.01 s.
        lag = max(0.01, (t(at[key]) - t(b["finished_at"])).total_seconds())
        f.write(f"copy lag after a backup (agent backing up every {every} s)\t{i + 1}\t{lag:.2f}\t0\t0\t0\n")
PY
summarize "copy lag after a backup (agent backing up every $every s)" copy_lag \
  "seconds from each backup's end to its manifest at the copy (moto's times, to the second), the agent backing up the benchmark database every $every s"
