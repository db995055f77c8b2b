#!/usr/bin/env bash
# Starts a local redis-server, one ape-encoder and one ape-decoder on
# loopback. State (pids, logs) in $RUN. Stop with deploy/local/stop.sh.
set -euo pipefail
source "$(dirname "$0")/env.sh"
mkdir -p "$RUN"
wait_port() {  # host:port, pid, name
  local host=${1%:*} port=${1##*:}
  for _ in $(seq 1 200); do
    if (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; then return 0; fi
    kill -0 "$2" 2>/dev/null || { echo "start: $3 exited; see $RUN/$3.log" >&2; tail -5 "$RUN/$3.log" >&2; return 1; }
    sleep 0.1
  done
  echo "start: $3 did not open $1" >&2
  return 1
}
if [[ -f "$RUN/redis.pid" ]] && kill -0 "$(cat "$RUN/redis.pid")" 2>/dev/null; then
  echo "start: already running (deploy/local/stop.sh first)" >&2
  exit 1
fi
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$RUN" \
  --maxmemory 1gb --maxmemory-policy allkeys-lru >"$RUN/redis.log" 2>&1 &
echo $! >"$RUN/redis.pid"
wait_port "127.0.0.1:$REDIS_PORT" "$(cat "$RUN/redis.pid")" redis
"$BIN/ape-encoder" --listen="$ENCODER_ADDR" --redis="redis://127.0.0.1:$REDIS_PORT" "${MODEL_ARGS[@]}" \
  >"$RUN/encoder.log" 2>&1 &
echo $! >"$RUN/encoder.pid"
"$BIN/ape-decoder" --listen="$DECODER_ADDR" --redis="redis://127.0.0.1:$REDIS_PORT" --encoder="$ENCODER_ADDR" \
  "${MODEL_ARGS[@]}" >"$RUN/decoder.log" 2>&1 &
echo $! >"$RUN/decoder.pid"
wait_port "$ENCODER_ADDR" "$(cat "$RUN/encoder.pid")" encoder
wait_port "$DECODER_ADDR" "$(cat "$RUN/decoder.pid")" decoder
echo "start: redis 127.0.0.1:$REDIS_PORT, encoder $ENCODER_ADDR, decoder $DECODER_ADDR, model $MODEL (logs in $RUN)" >&2
