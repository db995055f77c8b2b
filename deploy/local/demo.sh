#!/usr/bin/env bash
# The main job end to end: start Redis, an encoder and a decoder on loopback,
# encode the sample documents in deploy/local/docs once, then ask the
# questions of deploy/local/questions.tsv about them, each with APE (the
# documents' cached KV) and with SEQUENTIAL (the baseline: one prefill of the
# whole prompt), and say per question and in a tally which answers are right
# and what they cost. Everything is stopped at the end (KEEP_RUNNING=1 to keep
# it). QUESTIONS=file asks other questions (same columns); VERBOSE=1 also
# prints apectl's own stats lines.
# With another model (the stories260K fallback) it continues one story over
# two cached passages instead: no expected answers, no tally.
# --chat (a MODEL with a chat template: Llama 3, Qwen, Mistral): asks one
# question (QUESTION=...) about the documents in the model's chat format, the
# documents inside the user's turn (README "Chat models").
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
source "$HERE/env.sh"

CHAT_ARGS=()
for arg in "$@"; do
  case "$arg" in
    --chat) CHAT_ARGS=(--chat) ;;
    *) echo "demo: unknown argument '$arg' (takes only --chat)" >&2; exit 2 ;;
  esac
done

PREFIX="You answer questions about the documents below ."
DOCS="$HERE/docs"
QUESTIONS=${QUESTIONS:-$HERE/questions.tsv}
MAX_TOKENS=12  # an answer restates a fact: 3 tokens, then " ." stops it

# The question templates the model was trained on (models/recipe/corpus.py,
# "short" facts), each with the fact that answers it: {e} the entity, {v} the
# value.
TEMPLATES=(
  "what city does {e} visit ?={e} visits {v} ."
  "what animal does {e} own ?={e} owns {v} ."
  "what color does {e} like ?={e} likes {v} ."
  "what did {e} become ?={e} became {v} ."
  "when did {e} arrive ?={e} arrived {v} ."
)

fact_for() {  # QUESTION VALUE: prints the fact that answers QUESTION with VALUE
  local t q fact head tail e
  for t in "${TEMPLATES[@]}"; do
    q=${t%%=*} fact=${t#*=}
    head=${q%%"{e}"*} tail=${q#*"{e}"}
    [[ "$1" == "$head"* && "$1" == *"$tail" ]] || continue
    e=${1#"$head"} e=${e%"$tail"}
    [[ "$e" =~ ^[A-Za-z]+$ ]] || continue
    fact=${fact//"{e}"/$e}
    echo "${fact//"{v}"/$2}"
    return 0
  done
  return 1
}

# Reads $QUESTIONS into Q (question), WANT (the fact a right answer restates,
# without its " .") and SRC (document), and checks each expected answer
# against its document, before anything is started.
load_questions() {
  local q v doc fact bad=0 n=0
  Q=() WANT=() SRC=()
  while IFS=$'\t' read -r q v doc; do
    n=$((n + 1))
    [[ -z "$q" || "$q" == "#"* ]] && continue
    if [[ -z "$v" || -z "$doc" ]]; then
      echo "demo: $QUESTIONS:$n: want 3 tab-separated columns: question, expected answer, document" >&2
      bad=1; continue
    fi
    if ! fact=$(fact_for "$q" "$v"); then
      echo "demo: $QUESTIONS:$n: \"$q\" is none of the model's question templates" >&2
      bad=1; continue
    fi
    if [[ ! -f "$DOCS/$doc" ]]; then
      echo "demo: $QUESTIONS:$n: no document $DOCS/$doc" >&2
      bad=1; continue
    fi
    if ! grep -qwF -- "$fact" "$DOCS/$doc"; then
      echo "demo: $QUESTIONS:$n: $doc does not say \"$fact\"" >&2
      bad=1; continue
    fi
    Q+=("$q") WANT+=("${fact% .}") SRC+=("$doc")
  done <"$QUESTIONS"
  ((bad == 0)) || exit 1
  ((${#Q[@]} > 0)) || { echo "demo: no questions in $QUESTIONS" >&2; exit 1; }
}

stat() {  # NAME STATS_LINE: the "NAME <x> ms" field of apectl generate's stats line
  sed -n "s/.*, $1 \([0-9.]*\) ms.*/\1/p" <<<"$2"
}
count() {  # NAME STATS_LINE: the "NAME=<n>" field
  sed -n "s/.* $1=\([0-9]*\) .*/\1/p" <<<"$2"
}
mean() { printf '%s\n' "$@" | awk '{ s += $1 } END { printf "%.1f", s / NR }'; }
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { printf "%.1f", (v[int((NR + 1) / 2)] + v[int(NR / 2) + 1]) / 2 }'; }

# ask MODE QUESTION: sets ANSWER (one line, trimmed) and STATS (apectl's stats line)
ask() {
  local err="$RUN/demo-generate.err"
  if ! ANSWER=$("$BIN/apectl" generate --decoder="$DECODER_ADDR" --prefix="$PREFIX" --context-key="$KEYS" \
      --query="question : $2 answer :" --max-tokens="$MAX_TOKENS" --stop=" ." --mode="$1" 2>"$err"); then
    cat "$err" >&2
    exit 1
  fi
  ANSWER=$(tr '\n' ' ' <<<"$ANSWER" | sed 's/^ *//; s/ *$//')
  STATS=$(grep '^\[MODE_' "$err" || true)
  [[ -n "$STATS" ]] || { echo "demo: no stats line from apectl generate" >&2; cat "$err" >&2; exit 1; }
  if [[ "${VERBOSE:-0}" == 1 ]]; then echo "      $STATS"; fi
}

QA=0
if ((${#CHAT_ARGS[@]})); then
  if [[ "$MODEL" == *apeserve-qa*.gguf || "$MODEL" == *.bin ]]; then
    echo "demo: --chat needs a MODEL with a chat template (e.g. a Llama 3 or Qwen instruct GGUF);" \
      "$(basename "$MODEL") has none" >&2
    exit 2
  fi
  PREFIX="Answer the question from the documents."
  QUESTION=${QUESTION:-"What city does Neub visit?"}
elif [[ "$MODEL" == *apeserve-qa*.gguf ]]; then  # also its widened and quantized files (models/README.md)
  QA=1
  load_questions
else  # stories260K: a story prefix, two story passages
  PREFIX="Once upon a time"
  DOCS="$HERE/docs-stories"
  QUESTION=${QUESTION:-" One day, Lily"}
fi

"$HERE/stop.sh" 2>/dev/null || true
"$HERE/start.sh"
[[ "${KEEP_RUNNING:-0}" == 1 ]] || trap '"$HERE/stop.sh"' EXIT

echo "== encoding $(ls "$DOCS" | wc -l) documents from $DOCS (model $(basename "$MODEL"))"
"$BIN/apectl" encode --encoder="$ENCODER_ADDR" --prefix="$PREFIX" "${CHAT_ARGS[@]}" "$DOCS" | tee "$RUN/demo-keys.tsv"
KEYS=$(cut -f1 "$RUN/demo-keys.tsv" | paste -sd, -)

if ((QA == 0)); then
  echo "== question: $QUESTION"
  echo "== answer (APE over the cached documents):"
  "$BIN/apectl" generate --decoder="$DECODER_ADDR" --prefix="$PREFIX" --context-key="$KEYS" \
    --query="$QUESTION" --max-tokens=24 "${CHAT_ARGS[@]}"
  echo "== the same with SEQUENTIAL encoding (the baseline, no cache reuse):"
  "$BIN/apectl" generate --decoder="$DECODER_ADDR" --prefix="$PREFIX" --context-key="$KEYS" \
    --query="$QUESTION" --max-tokens=24 --mode=sequential "${CHAT_ARGS[@]}"
  exit 0
fi

N=${#Q[@]}
echo "== $N questions from $(basename "$QUESTIONS"), each answered with APE (the documents' KV from the"
echo "   cache, only the question prefilled) and SEQUENTIAL (the baseline: the whole prompt prefilled)."
echo "   RIGHT = the answer restates the document's fact exactly. Times from apectl's stats line;"
echo "   one warm-up request per mode first, not counted."
ask ape "${Q[0]}"
echo "   APE runs with the decoder's preset $(sed -n 's/^\[MODE_APE \(T=[0-9.]* S=[0-9.]*\)\].*/\1/p' <<<"$STATS")."
ask sequential "${Q[0]}"
WIDTH=0  # of the answer column
for w in "${WANT[@]}"; do
  if ((${#w} + 2 > WIDTH)); then WIDTH=$((${#w} + 2)); fi
done

declare -A RIGHT=([ape]=0 [sequential]=0)
TTFT_ape=() TTFT_sequential=()
for i in "${!Q[@]}"; do
  printf 'Q%d  %s  (expected "%s", %s)\n' $((i + 1)) "${Q[i]}" "${WANT[i]}" "${SRC[i]}"
  for mode in ape sequential; do
    ask "$mode" "${Q[i]}"
    verdict=WRONG
    if [[ "$ANSWER" == "${WANT[i]}" ]]; then verdict=RIGHT; RIGHT[$mode]=$((RIGHT[$mode] + 1)); fi
    ttft=$(stat "first token" "$STATS")
    prompt=$(count prompt "$STATS") cached=$(count cached "$STATS")
    if [[ $mode == ape ]]; then TTFT_ape+=("$ttft"); else TTFT_sequential+=("$ttft"); fi
    printf "    %-10s %s  %-${WIDTH}s  first token %5s ms  (cache load %s ms, prefill %s ms of %d tokens)\n" \
      "${mode^^}" "$verdict" "\"$ANSWER\"" "$ttft" "$(stat "cache load" "$STATS")" "$(stat prefill "$STATS")" \
      $((prompt - cached))
  done
done

echo "== tally over $N questions about $(ls "$DOCS" | wc -l) cached documents"
printf '    %-10s %d/%d right   mean first token %5s ms (median %s ms)\n' \
  APE "${RIGHT[ape]}" "$N" "$(mean "${TTFT_ape[@]}")" "$(median "${TTFT_ape[@]}")" \
  SEQUENTIAL "${RIGHT[sequential]}" "$N" "$(mean "${TTFT_sequential[@]}")" "$(median "${TTFT_sequential[@]}")"
