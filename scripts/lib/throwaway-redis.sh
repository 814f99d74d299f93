# Sourced by scripts: a throwaway redis-server on a random loopback port in a temp dir.
#   redis_start     starts it (extra arguments are passed on); sets REDIS_PORT, REDIS_WORK
#                   (kept if already set, so a stopped server comes back on the same port)
#   redis_pause     stops it, keeping its port and directory (redis_start brings it back)
#   redis_stop      stops it and removes its directory (call it from your EXIT trap)
redis_start() {
  REDIS_WORK=${REDIS_WORK:-$(mktemp -d /tmp/lifeboat-redis.XXXXXX)}
  REDIS_PORT=${REDIS_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$REDIS_WORK" --save '' --appendonly no \
    --daemonize yes --pidfile "$REDIS_WORK/pid" --logfile "$REDIS_WORK/log" \
    --repl-diskless-sync-delay 0 "$@"
  for _ in $(seq 100); do
    redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && return 0
    sleep 0.05
  done
  echo "redis-server did not start; its log:" >&2
  cat "$REDIS_WORK/log" >&2
  return 1
}

redis_pause() {
  redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
}

redis_stop() {
  if [ -n "${REDIS_WORK:-}" ]; then
    local pid=
    [ -s "$REDIS_WORK/pid" ] && pid=$(cat "$REDIS_WORK/pid")
    if [ -n "$pid" ]; then
      kill "$pid" 2>/dev/null || true
      # It writes its log until it has exited: its directory is removed after that.
      for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.05
      done
    fi
    rm -rf "$REDIS_WORK"
  fi
}
