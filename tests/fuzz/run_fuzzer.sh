#!/usr/bin/env bash
# run_fuzzer.sh FUZZER SEED_DIR WORK_DIR SECONDS: fuzzes for SECONDS starting
# from the committed seeds (copied, never written back), prints libFuzzer's
# summary line, and fails on any finding (a crash, a sanitizer report, a
# timeout or an allocation over the RSS limit), leaving the input in WORK_DIR.
set -euo pipefail
fuzzer=$(readlink -f "$1") seeds=$(readlink -f "$2") work=$3 seconds=$4
rm -rf "$work" && mkdir -p "$work/corpus" "$work/findings"
cp "$seeds"/* "$work/corpus/" 2>/dev/null || true
cd "$work"
"$fuzzer" -max_total_time="$seconds" -rss_limit_mb=2048 -malloc_limit_mb=1024 -timeout=10 \
  -max_len=65536 -print_final_stats=1 -artifact_prefix="$work/findings/" corpus 2>"$work/log" || {
  tail -40 "$work/log" >&2
  echo "$(basename "$fuzzer"): FINDING, input kept in $work/findings" >&2
  exit 1
}
grep -E "^stat::number_of_executed_units|^stat::new_units_added|^stat::peak_rss_mb" "$work/log" | tr '\n' ' '
echo
