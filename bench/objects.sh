#!/usr/bin/env bash
# Object sync benchmark, in one run on a throwaway local S3 (moto):
#   a directory of N small files (1–16 KiB of random bytes) copied whole by each tool into an empty
#   bucket, then 1 % of them changed, R times:
#     aws s3 sync DIR s3://mirror/            (size + mtime comparison, no content hashes)
#     lifeboat backup (kind = "objects")      (snapshot, read back as the next change index; keyed blobs; zstd + age)
#   and the same from an S3 prefix (aws s3 sync s3://src s3://mirror vs lifeboat from s3://src).
#   Then the last backup of the directory comes back whole (against aws s3 sync from the mirror),
#   one file of it comes back (against aws s3 cp of that object), it is verified, checked with --read-data and pruned (blob collection over every backup): with
#   their peak RSS, which bench/budgets.json gates.
# FILES=tiny counts objects instead: N files of a few bytes in directories of 1,000, into a local
#   directory repository (moto cannot hold a million objects, nor aws s3 sync write anywhere
#   else), lifeboat's commands alone, each once, with the repository requests each made:
#     the first backup, one with 1 % changed, one with nothing changed, a whole restore, one file
#     restored, verify, check, check --read-data and prune. LINKS=K writes N/K files (a multiple
#     of 1,000) and makes the other names hard links to them (N names, N/K inodes: ten million
#     names fit on a disk that cannot hold ten million files); RESTORE=0 leaves out the whole
#     restore.
# Usage: bench/objects.sh [N]   (default 10000; RUNS=3; OBJECTS_S3=0 leaves out the S3 source)
. "$(dirname "$0")/lib.sh"
n=${1:-10000}
scripts/install-deps.sh
command -v /usr/bin/time >/dev/null 2>&1 || apt-get install -y -qq time >/dev/null
[ -x "$venv/bin/aws" ] || "$venv/bin/pip" install -q --disable-pip-version-check awscli
cargo build --release --quiet --bins
lifeboat=$root/target/release/lifeboat
policy() { # NAME FROM REPOSITORY-LINES KEEP-LAST [SOURCE-EXTRA]
  cat > "$work/$1.toml" <<TOML
[repository]
$3
[encryption]
recipients = ["$recipient"]
index_key = "bench-index-key-0123456789abcdef0123456789"
[defaults]
retention = { keep_last = $4 }
[[sources]]
name = "files"
kind = "objects"
from = "$2"
${5:-}
TOML
}
if [ "${FILES:-}" = tiny ]; then
  links=${LINKS:-1}
  rm -rf "$work" && mkdir -p "$work/data"
  files=$((n / links))
  echo "== writing $files files of a few bytes, and $n names for them" >&2
  python3 - "$work/data" "$files" <<'PY'
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    d = os.path.join(root, f"d{i // 1000:05d}")
    if i % 1000 == 0:
        os.makedirs(d)
    with open(os.path.join(d, f"f{i % 1000:03d}.txt"), "w") as f:
        f.write(f"{i}\n")
PY
  # The other names: directories of hard links to the first ones.
  for ((d = files / 1000; d < n / 1000; d++)); do
    cp -al "$work/data/$(printf d%05d $((d % (files / 1000))))" "$work/data/$(printf d%05d "$d")"
  done
  "$lifeboat" keygen > "$work/key.txt" 2>/dev/null
  recipient=$(sed -n 's/^# public key: //p' "$work/key.txt")
  policy dir "dir://$work/data" "url = \"file://$work/repo\"" 2
  db_size=$(du -sb "$work/data" | cut -f1)
  : > "$work/results.tsv"
  : > "$work/requests.tsv"
  # One run of CMD (its --json on stdout): its wall, CPU and peak RSS, and the repository
  # requests its JSON reports.
  counted() { # NAME CMD
    sync
    /usr/bin/time -f '%e %U %S %M' -o "$work/time" bash -c "$2" >"$work/out.json" 2>"$work/err" \
      || { echo "$1 failed:" >&2; cat "$work/err" >&2; exit 1; }
    printf '%s\t1\t%s\n' "$1" "$(tail -n 1 "$work/time" | tr ' ' '\t')" >> "$work/results.tsv"
    python3 - "$1" "$work/out.json" >> "$work/requests.tsv" <<'PY'
import json, sys
total = {}
def walk(v):
    if isinstance(v, dict):
        for k, x in v.items():
            if k == "requests" and isinstance(x, dict):
                # A backup's are split into the repository's and the source's.
                for op, c in x.get("repository", x).items():
                    if isinstance(c, int):
                        total[op] = total.get(op, 0) + c
            else:
                walk(x)
    elif isinstance(v, list):
        for x in v:
            walk(x)
walk(json.load(open(sys.argv[2])))
print(f"{sys.argv[1]}\t{json.dumps(total)}")
PY
    echo "   $1: $(tail -n 1 "$work/time"), $(tail -n 1 "$work/requests.tsv" | cut -f2)" >&2
  }
  L="'$lifeboat'"
  P="--policy '$work/dir.toml'"
  echo "== $n names: backups" >&2
  counted "lifeboat backup, first run" "$L backup $P --json"
  python3 - "$work/data" "$n" <<'PY'
import os, random, sys
root, n = sys.argv[1], int(sys.argv[2])
random.seed(1)
for i in random.sample(range(n), max(1, n // 100)):
    p = os.path.join(root, f"d{i // 1000:05d}", f"f{i % 1000:03d}.txt")
    os.unlink(p)  # a hard link's other names keep the old content
    with open(p, "w") as f:
        f.write(f"{i} changed\n")
PY
  counted "lifeboat backup, 1 % changed" "$L backup $P --json"
  counted "lifeboat backup, nothing changed" "$L backup $P --json"
  echo "== $n names: the last backup restored, verified, checked and pruned" >&2
  if [ "${RESTORE:-1}" = 1 ]; then
    counted "lifeboat restore, the whole snapshot into a directory" \
      "$L restore $P --source files --identity '$work/key.txt' --to '$work/back' --json"
    diff -r "$work/data" "$work/back" >/dev/null || { echo "the restored tree differs from the source" >&2; exit 1; }
    rm -rf "$work/back"
  fi
  one=d00000/f007.txt
  counted "lifeboat restore --path, one file" \
    "$L restore $P --source files --identity '$work/key.txt' --to '$work/one' --path $one --json"
  cmp -s "$work/data/$one" "$work/one/$one" || { echo "the restored file differs from the source" >&2; exit 1; }
  counted "lifeboat-verifier verify, every content re-hashed" \
    "'$root/target/release/lifeboat-verifier' verify $P --source files --identity '$work/key.txt' --json"
  counted "lifeboat check (blob lists)" "$L check $P --json"
  counted "lifeboat check --read-data" "$L check $P --identity '$work/key.txt' --read-data --json"
  counted "lifeboat prune, blob collection" "$L prune $P --json"
  echo "   stored: $(du -sh "$work/repo" | cut -f1) in $(find "$work/repo" -type f | wc -l) files" >&2
  summarize "lifeboat backup, first run" "objects_files-$n" \
    "$n files of a few bytes ($((n / links)) distinct) in directories of 1,000, into a local directory repository"
  exit 0
fi
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
policy dir "dir://$work/data" "url = \"s3://repo/lb\"
endpoint = \"$endpoint\"" 50
policy s3 "s3://src/data/" "url = \"s3://repo2/lb\"
endpoint = \"$endpoint\"" 50 "endpoint = \"$endpoint\""
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
echo "== first full copy, each tool into an empty bucket" >&2
timed "aws s3 sync DIR s3://mirror (first run, empty bucket)" "'$root/$venv/bin/aws' --endpoint-url $endpoint s3 sync --quiet '$work/data' s3://mirror/data/"
timed "lifeboat backup, dir source (first run)" "'$lifeboat' backup --policy '$work/dir.toml'"
awk -F'\t' '$1 ~ /^aws.*first run/ { a = $3 } $1 ~ /^lifeboat.*first run/ { l = $3 }
  END { printf "   first run: lifeboat %.2f × aws s3 sync into an empty bucket\n", l / a }' "$work/results.tsv" >&2
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
