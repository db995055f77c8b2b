#!/usr/bin/env bash
# The main job end to end: start Redis, an encoder and a decoder on loopback,
# encode the sample documents in deploy/local/docs once, then answer a
# question from the cached documents with APE, streaming the answer and the
# timings. Everything is stopped at the end (KEEP_RUNNING=1 to keep it).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
source "$HERE/env.sh"
"$HERE/stop.sh" 2>/dev/null || true
"$HERE/start.sh"
[[ "${KEEP_RUNNING:-0}" == 1 ]] || trap '"$HERE/stop.sh"' EXIT
if [[ "$MODEL" == *apeserve-qa.gguf ]]; then
  PREFIX="You answer questions about the documents below ."
  DOCS="$HERE/docs"
  QUESTION=${QUESTION:-"question : what city does Neub visit ? answer :"}
  STOP=(--stop " .")
else  # stories260K: a story prefix, two story passages
  PREFIX="Once upon a time"
  DOCS="$HERE/docs-stories"
  QUESTION=${QUESTION:-" One day, Lily"}
  STOP=()
fi
echo "== encoding $(ls "$DOCS" | wc -l) documents from $DOCS (model $(basename "$MODEL"))"
"$BIN/apectl" encode --encoder="$ENCODER_ADDR" --prefix="$PREFIX" "$DOCS"
KEYS=$("$BIN/apectl" encode --encoder="$ENCODER_ADDR" --prefix="$PREFIX" "$DOCS" 2>/dev/null | cut -f1 | paste -sd, -)
echo "== question: $QUESTION"
echo "== answer (APE over the cached documents):"
"$BIN/apectl" generate --decoder="$DECODER_ADDR" --prefix="$PREFIX" --context-key="$KEYS" \
  --query="$QUESTION" --max-tokens=24 "${STOP[@]}"
echo "== the same with SEQUENTIAL encoding (the baseline, no cache reuse):"
"$BIN/apectl" generate --decoder="$DECODER_ADDR" --prefix="$PREFIX" --context-key="$KEYS" \
  --query="$QUESTION" --max-tokens=24 --mode=sequential "${STOP[@]}"
