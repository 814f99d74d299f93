# Sourced by scripts: a throwaway PostgreSQL on a random loopback port in a temp dir.
#   pg_start        starts it; sets PG_BIN, PG_PORT, PG_WORK; stops it on EXIT
#   pg_pause        stops the server, keeping its data (pg_resume starts it again, same port)
#   pg_psql ARGS    psql as postgres over TCP
pg_start() {
  PG_BIN=$(pg_config --bindir)
  PG_WORK=$(mktemp -d /tmp/lifeboat-pg.XXXXXX)
  chmod 755 "$PG_WORK"
  PG_PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  PG_AS=()
  if [ "$(id -u)" -eq 0 ]; then
    chown postgres: "$PG_WORK"
    PG_AS=(setpriv --reuid=postgres --regid=postgres --init-groups --)
  fi
  trap pg_stop EXIT
  (cd / && "${PG_AS[@]}" "$PG_BIN/initdb" -D "$PG_WORK/data" -U postgres -A trust -E UTF8 --locale=C.UTF-8 --no-sync >/dev/null)
  pg_resume
}

pg_resume() {
  (cd / && "${PG_AS[@]}" "$PG_BIN/pg_ctl" -D "$PG_WORK/data" -l "$PG_WORK/log" -w \
    -o "-p $PG_PORT -k $PG_WORK -c listen_addresses=127.0.0.1 -c fsync=off ${PG_EXTRA_OPTS:-}" start >/dev/null)
}

pg_pause() {
  (cd / && "${PG_AS[@]}" "$PG_BIN/pg_ctl" -D "$PG_WORK/data" -m fast stop >/dev/null 2>&1) || true
}

pg_stop() {
  if [ -n "${PG_WORK:-}" ]; then
    (cd / && "${PG_AS[@]}" "$PG_BIN/pg_ctl" -D "$PG_WORK/data" -m fast stop >/dev/null 2>&1) || true
    rm -rf "$PG_WORK"
  fi
}

pg_psql() {
  "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U postgres "$@"
}
