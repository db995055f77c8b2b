#!/usr/bin/env bash
# Installs dependencies, builds, and runs the whole test suite (CTest).
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/install-deps.sh
deploy/build-grpc-cli.sh
(cd clients/node && npm ci --no-audit --no-fund --loglevel=error)
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j2
ctest --test-dir build --output-on-failure
