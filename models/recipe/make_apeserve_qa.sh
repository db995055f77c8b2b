#!/usr/bin/env bash
# Rebuilds models/apeserve-qa.gguf the way the shipped file was made (one
# thread, so the bytes repeat): an induction warm start of 800 steps, then the
# QA task with two-back exercises mixed in, exported at step $STEPS.
# Resumable: re-run after an interruption, each stage picks up its checkpoint.
#   models/recipe/make_apeserve_qa.sh [out prefix, default models/apeserve-qa]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${1:-$ROOT/models/apeserve-qa}
STEPS=${STEPS:-3000}
common=(--out "$OUT" --steps 20000 --threads 1 --facts short --questions 2,6 --batch 32 --copy-frac 0.3
        --entity-weight 1)
train() { /usr/bin/python3 "$ROOT/models/recipe/train.py" "${common[@]}" "$@"; }
# 1. Copy runs only (the induction head forms at step 450-500).
train --copy-kinds run --copy-warmup 1500 --eval-every 200 --until 800
# 2. QA on 2-8 documents, 30% exercises (runs and two-back triples).
train --copy-kinds run,triples --copy-warmup 800 --curriculum 0 --min-docs 2 --eval-every 100 --until "$STEPS"
# 3. Export the step-$STEPS weights (the schedule was planned for 20000 steps).
/usr/bin/python3 "$ROOT/models/recipe/train.py" --out "$OUT" --steps "$STEPS" --threads 1 --facts short
