#!/usr/bin/env bash
# Point-in-time restore benchmark: a base backup, then WAL written after it and streamed into the
# repository, restored to the end of the archive. All in one run on throwaway local servers:
#   PostgreSQL on its own: the unpacked base backup copied into place, replaying the same WAL
#     from a local directory (restore_command = 'cp DIR/%f %p') until it promotes
#   lifeboat restore --latest --start: download and check, decrypt and unpack the base backup,
#     then the server replays with `lifeboat wal fetch` (each segment checked) until it promotes
#   lifeboat-verifier verify: the daily replay drill of the same backup and archive
# Usage: bench/pitr.sh [ROWS] [WAL_MIB]   (default 5500000 rows ≈ 1 GB cluster, 1024 MiB of WAL; RUNS=3)
. "$(dirname "$0")/lib.sh"
bench_setup "${1:-5500000}"
wal_mib=${2:-1024}
slot=bench_pitr
sed -e "s|^kind = \"postgres\"|kind = \"postgres-physical\"\ncheckpoint = \"fast\"\nwal = { slot = \"$slot\", flush_interval = \"5s\" }|" \
  -e '/^globals = false/d' "$work/fs.toml" > "$work/pitr.toml"
# The server's OS user runs restore_command: it reads the policy, the key and the repository.
chmod -R a+rX "$work"

"$lifeboat" wal stream --policy "$work/pitr.toml" --source bench > "$work/stream.log" 2>&1 &
stream_pid=$!
"$lifeboat" backup --policy "$work/pitr.toml" > /dev/null
echo "== writing $wal_mib MiB of WAL after the base backup" >&2
from=$(pg_psql -d postgres -tA -c "select pg_current_wal_lsn()")
while [ "$(pg_psql -d postgres -tA -c "select pg_wal_lsn_diff(pg_current_wal_lsn(), '$from') >= $wal_mib::numeric * 1048576")" != t ]; do
  pg_psql -d bench -c "update events set n = n + 1 where id % 50 = $((RANDOM % 50))"
done
pg_psql -d postgres -tA -c "select pg_switch_wal()" > /dev/null
end=$(pg_psql -d postgres -tA -c "select pg_current_wal_lsn()")
for _ in $(seq 1 600); do
  [ "$(pg_psql -d postgres -tA -c "select restart_lsn >= '$end' from pg_replication_slots where slot_name = '$slot'")" = t ] && break
  sleep 0.5
done
kill -TERM "$stream_pid"; wait "$stream_pid" || true
pg_psql -d postgres -c "select pg_drop_replication_slot('$slot')" > /dev/null
wal_bytes=$(du -sb "$work/repo/wal" | cut -f1)

echo "== the plain copies PostgreSQL replays from on its own" >&2
"$lifeboat" restore --policy "$work/pitr.toml" --source bench --to "$work/base" > /dev/null 2>&1
mkdir -p "$work/walplain"
for f in $(find "$work/repo/wal/bench" -name '0*.zst.age' ! -name '*.history.*' -printf '%f\n' | cut -c1-24 | sort -u); do
  "$lifeboat" wal fetch --policy "$work/pitr.toml" --source bench "$f" "$work/walplain/$f" 2>/dev/null
done
segments=$(ls "$work/walplain" | wc -l)
chmod -R a+rX "$work"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
as_pg=""
if [ "$(id -u)" -eq 0 ]; then as_pg="setpriv --reuid=postgres --regid=postgres --init-groups --"; fi
stop="cd / && $as_pg '$PG_BIN/pg_ctl' -D '$work/copy' -m immediate stop > /dev/null 2>&1; rm -rf '$work/copy'"
cat > "$work/own.sh" <<SH
set -euo pipefail
cp -a '$work/base' '$work/copy'
chmod 700 '$work/copy'
touch '$work/copy/recovery.signal'
echo "restore_command = 'cp $work/walplain/%f %p'" >> '$work/copy/postgresql.auto.conf'
if [ -n '$as_pg' ]; then chown -R postgres: '$work/copy'; fi
cd / && $as_pg '$PG_BIN/pg_ctl' -D '$work/copy' -l '$work/copy/startup.log' -W -o '-p $port -k $work/copy -c lc_messages=C' start
# Done when recovery ended and the cluster was promoted, as lifeboat restore --start waits.
until grep -q 'database system is ready to accept connections' '$work/copy/startup.log' 2>/dev/null; do
  if grep -q 'database system is shut down' '$work/copy/startup.log' 2>/dev/null; then exit 1; fi
  sleep 0.05
done
SH

echo "== measuring ($runs runs each, interleaved; $segments segments)" >&2
# One run of each in turn, so that the machine's slow moments fall on all three alike.
for _ in $(seq 1 "$runs"); do
  MEASURE_RUNS=1 measure "PostgreSQL: copy the base, replay from a local directory (cp)" "bash '$work/own.sh'" "$stop"
  MEASURE_RUNS=1 measure "lifeboat restore --latest --start" \
    "'$lifeboat' restore --policy '$work/pitr.toml' --source bench --to '$work/copy' --latest --start --port $port" "$stop"
  # The daily drill on the same backup and archive: download, unpack, pg_verifybackup, replay
  # to a random point and on to the end, pg_amcheck over every table and index, the checks.
  MEASURE_RUNS=1 measure "lifeboat-verifier verify (the replay drill)" \
    "'$verifier' verify --policy '$work/pitr.toml' --source bench" "rm -rf '$work/repo/verifications'"
done
summarize "PostgreSQL: copy the base, replay from a local directory (cp)" pitr \
  "$segments WAL segments after the base backup ($((wal_bytes / 1048576)) MiB stored)"
