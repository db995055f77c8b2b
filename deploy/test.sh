#!/usr/bin/env bash
# Installs dependencies, builds, and runs the whole test suite: CTest in build/
# (unit, end-to-end, layer guards), then the libFuzzer targets built with clang
# in build-fuzz/ for APE_FUZZ_SECONDS each (default 60; two at a time).
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/install-deps.sh
deploy/build-grpc-cli.sh
(cd clients/node && npm ci --no-audit --no-fund --loglevel=error)
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j2
ctest --test-dir build --output-on-failure
CXX=clang++ cmake -S . -B build-fuzz -DAPE_FUZZ=ON -DAPE_FUZZ_SECONDS="${APE_FUZZ_SECONDS:-60}" >/dev/null
cmake --build build-fuzz -j2
ctest --test-dir build-fuzz --output-on-failure -j2
