#!/usr/bin/env bash
# Stops what deploy/local/start.sh started (SIGTERM: graceful shutdown).
source "$(dirname "$0")/env.sh"
for name in decoder encoder redis; do
  f="$RUN/$name.pid"
  [[ -f "$f" ]] || continue
  pid=$(cat "$f")
  if kill "$pid" 2>/dev/null; then
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    echo "stop: $name stopped" >&2
  fi
  rm -f "$f"
done
