# Settings shared by the local launcher scripts (sourced, not run).
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BIN=${APESERVE_BIN:-$ROOT/build/bin}
RUN=${APESERVE_RUN:-/tmp/apeserve-local}
REDIS_PORT=${REDIS_PORT:-6390}
ENCODER_ADDR=${ENCODER_ADDR:-127.0.0.1:50061}
DECODER_ADDR=${DECODER_ADDR:-127.0.0.1:50062}
# The default model is the project's own (models/); stories260K (shipped in
# tests/data) is the fallback while it is missing.
if [[ -z "${MODEL:-}" ]]; then
  if [[ -f "$ROOT/models/apeserve-qa.gguf" ]]; then
    MODEL=$ROOT/models/apeserve-qa.gguf
    TOKENIZER=""
  else
    MODEL=$ROOT/tests/data/stories260K.bin
    TOKENIZER=$ROOT/tests/data/tok512.bin
  fi
fi
TOKENIZER=${TOKENIZER:-}
MODEL_ARGS=(--model="$MODEL")
if [[ -n "$TOKENIZER" ]]; then MODEL_ARGS+=(--tokenizer="$TOKENIZER"); fi
