#!/usr/bin/env bash
# Where a PostgreSQL backup's time goes: `perf record` of `lifeboat backup` (release build, into
# a local directory) on the benchmark table, reported flat by shared object and symbol, so the
# cost of each stage (pg_dump's stream parsing, SHA-256, zstd, age, the fingerprint's row hashing)
# can be read off. Needs perf (linux-perf; installed if missing).
# Usage: bench/profile.sh [ROWS]   (default 2000000 rows ≈ 300 MB)
. "$(dirname "$0")/lib.sh"
command -v perf >/dev/null 2>&1 || apt-get install -y -qq linux-perf >/dev/null
rows=${1:-2000000}
bench_setup "$rows"
mkdir -p "$results"
out=$results/$(date -u +%Y%m%dT%H%M%SZ)-profile.txt
perf record -q -F 499 -g -o "$work/perf.data" -- "$lifeboat" backup --policy "$work/fs.toml" 2>/dev/null
set +o pipefail # `head` closes the pipes early
{
  echo "# lifeboat backup of $rows rows ($(du -sm "$work/repo" | cut -f1) MiB stored), perf samples by shared object"
  perf report -i "$work/perf.data" --stdio --no-children --sort comm,dso -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -20
  echo
  echo "# top symbols"
  perf report -i "$work/perf.data" --stdio --no-children --sort comm,symbol -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -40
} > "$out"
cat "$out"
