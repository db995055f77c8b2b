#!/usr/bin/env bash
# The model recipe is repeatable: two short runs with the same seed export
# byte-identical GGUF files (single-threaded torch), and a different seed
# does not.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
run() { /usr/bin/python3 "$ROOT/models/recipe/train.py" --out "$T/$1" --steps 12 --eval-every 1000 \
          --ckpt-every 1000 --threads 1 --batch 8 --dim 64 --hidden 128 --layers 2 --seed "$2" >/dev/null; }
run a 5; run b 5; run c 6
sa=$(sha256sum <"$T/a.gguf"); sb=$(sha256sum <"$T/b.gguf"); sc=$(sha256sum <"$T/c.gguf")
echo "seed 5: ${sa%% *}"; echo "seed 5: ${sb%% *}"; echo "seed 6: ${sc%% *}"
[[ "$sa" == "$sb" ]] || { echo "FAIL: same seed, different model bytes"; exit 1; }
[[ "$sa" != "$sc" ]] || { echo "FAIL: different seeds, same model bytes"; exit 1; }
# The export loads in apeserve, and apeserve's tokenizer gives the recipe's ids.
if [[ -n "${APE_BIN_DIR:-}" ]]; then
  "$APE_BIN_DIR/apectl" info --model "$T/a.gguf" >/dev/null
  /usr/bin/python3 "$ROOT/tests/reference/recipe_tokenizer_check.py" "$APE_BIN_DIR/apectl" "$T/a.gguf" 5
fi
echo "1 passed, 0 failed"
