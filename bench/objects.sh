#!/usr/bin/env bash
# Object sync benchmark, in one run on a throwaway local S3 (moto):
#   a directory of N small files (1–16 KiB of random bytes), then 1 % of them changed, R times:
#     aws s3 sync DIR s3://mirror/            (size + mtime comparison, no content hashes)
#     lifeboat backup (kind = "objects")      (snapshot, read back as the next change index; keyed blobs; zstd + age)
#   and the same from an S3 prefix (aws s3 sync s3://src s3://mirror vs lifeboat from s3://src).
#   Then the last backup of the directory comes back whole (against aws s3 sync from the mirror),
#   one file of it comes back (against aws s3 cp of that object), it is verified, checked with --read-data and pruned (blob collection over every backup): with
#   their peak RSS, which bench/budgets.json gates.
# Usage: bench/objects.sh [N]   (default 10000; RUNS=3; OBJECTS_S3=0 leaves out the S3 source)
. "$(dirname "$0")/lib.sh"
n=${1:-10000}
scripts/install-deps.sh
command -v /usr/bin/time >/dev/null 2>&1 || apt-get install -y -qq time >/dev/null
[ -x "$venv/bin/aws" ] || "$venv/bin/pip" install -q --disable-pip-version-check awscli
cargo build --release --quiet --bins
lifeboat=$root/target/release/lifeboat
rm -rf "$work" && mkdir -p "$work/data"
moto_start
trap 'kill $moto_pid 2>/dev/null' EXIT
for b in src mirror mirror2 repo repo2; do aws s3 mb "s3://$b" >/dev/null; done
echo "== writing $n files" >&2
python3 - "$work/data" "$n" <<'PY'
import os, random, sys
root, n = sys.argv[1], int(sys.argv[2])
random.seed(1)
for i in range(n):
    d = os.path.join(root, f"d{i % 100:02d}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"f{i:06d}.bin"), "wb") as f:
        f.write(os.urandom(random.randint(1024, 16384)))
PY
[ "${OBJECTS_S3:-1}" = 1 ] && aws s3 sync --quiet "$work/data" s3://src/data/
"$lifeboat" keygen > "$work/key.txt" 2>/dev/null
recipient=$(sed -n 's/^# public key: //p' "$work/key.txt")
policy() { # NAME FROM REPO-BUCKET [SOURCE-EXTRA]
  cat > "$work/$1.toml" <<TOML
[repository]
url = "s3://$3/lb"
endpoint = "$endpoint"
[encryption]
recipients = ["$recipient"]
index_key = "bench-index-key-0123456789abcdef0123456789"
[defaults]
retention = { keep_last = 50 }
[[sources]]
name = "files"
kind = "objects"
from = "$2"
${4:-}
TOML
}
policy dir "dir://$work/data" repo
policy s3 "s3://src/data/" repo2 "endpoint = \"$endpoint\""
db_size=$(du -sb "$work/data" | cut -f1)
: > "$work/results.tsv"
timed() { # NAME CMD
  /usr/bin/time -f '%e %U %S %M' -o "$work/time" bash -c "$2" >/dev/null 2>"$work/err" \
    || { echo "$1 failed:" >&2; cat "$work/err" >&2; exit 1; }
  printf '%s\t%s\t%s\n' "$1" 0 "$(tail -n 1 "$work/time" | tr ' ' '\t')" >> "$work/results.tsv"
  echo "   $1: $(tail -n 1 "$work/time")" >&2
}
change() { # 1 % of the files get new content
  python3 - "$work/data" "$n" "$1" <<'PY'
import os, random, sys
root, n, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
random.seed(seed)
for i in random.sample(range(n), max(1, n // 100)):
    with open(os.path.join(root, f"d{i % 100:02d}", f"f{i:06d}.bin"), "wb") as f:
        f.write(os.urandom(random.randint(1024, 16384)))
PY
}
echo "== first full copy (not timed against each other: setup)" >&2
aws s3 sync --quiet "$work/data" s3://mirror/data/
"$lifeboat" backup --policy "$work/dir.toml" >/dev/null 2>&1
if [ "${OBJECTS_S3:-1}" = 1 ]; then
  aws s3 sync --quiet s3://src/data/ s3://mirror2/data/
  "$lifeboat" backup --policy "$work/s3.toml" >/dev/null 2>&1
fi
echo "== incremental runs, 1 % changed each time ($runs runs)" >&2
for r in $(seq 1 "$runs"); do
  change "$r"
  timed "aws s3 sync DIR s3://mirror (1 % changed)" "'$root/$venv/bin/aws' --endpoint-url $endpoint s3 sync --quiet '$work/data' s3://mirror/data/"
  timed "lifeboat backup, dir source (1 % changed)" "'$lifeboat' backup --policy '$work/dir.toml'"
  [ "${OBJECTS_S3:-1}" = 1 ] || continue
  aws s3 sync --quiet "$work/data" s3://src/data/
  timed "aws s3 sync s3://src s3://mirror2 (1 % changed)" "'$root/$venv/bin/aws' --endpoint-url $endpoint s3 sync --quiet s3://src/data/ s3://mirror2/data/"
  timed "lifeboat backup, S3 source (1 % changed)" "'$lifeboat' backup --policy '$work/s3.toml'"
done
echo "== the last backup restored, verified, checked and pruned" >&2
timed "aws s3 sync s3://mirror DIR (the whole copy back)" "'$root/$venv/bin/aws' --endpoint-url $endpoint s3 sync --quiet s3://mirror/data/ '$work/back-aws'"
timed "lifeboat restore, the whole snapshot into a directory" "'$lifeboat' restore --policy '$work/dir.toml' --source files --identity '$work/key.txt' --to '$work/back'"
diff -r "$work/data" "$work/back" >/dev/null || { echo "the restored tree differs from the source" >&2; exit 1; }
one="d07/f$(printf %06d 7).bin"
timed "aws s3 cp s3://mirror one file back" "'$root/$venv/bin/aws' --endpoint-url $endpoint s3 cp --quiet s3://mirror/data/$one '$work/one-aws.bin'"
timed "lifeboat restore --path, one file" "'$lifeboat' restore --policy '$work/dir.toml' --source files --identity '$work/key.txt' --to '$work/one' --path $one --json > '$work/one.json'"
cmp -s "$work/data/$one" "$work/one/$one" || { echo "the restored file differs from the source" >&2; exit 1; }
python3 - "$work/one.json" >&2 <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"   one file: {r['result']['restored']['snapshot_read']} stored bytes of the snapshot read, requests {r['requests']}")
PY
timed "lifeboat-verifier verify, every blob re-hashed" "'$root/target/release/lifeboat-verifier' verify --policy '$work/dir.toml' --source files --identity '$work/key.txt'"
timed "lifeboat check --read-data" "'$lifeboat' check --policy '$work/dir.toml' --identity '$work/key.txt' --read-data"
timed "lifeboat prune, blob collection over every backup" "'$lifeboat' prune --policy '$work/dir.toml'"
summarize "aws s3 sync DIR s3://mirror (1 % changed)" "objects${BENCH_KIND_SUFFIX:-}" \
  "$n files, 1 % changed per run, local S3 (moto); lifeboat re-hashes nothing unchanged and stores changed content zstd + age"
