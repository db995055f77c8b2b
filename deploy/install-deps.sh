#!/usr/bin/env bash
# Installs every Debian bookworm package apeserve needs to build, test and run.
# Idempotent (skips when everything is present), quiet, and fails loudly.
set -euo pipefail

PACKAGES=(
  build-essential cmake pkg-config git ca-certificates
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler  # gRPC API
  libabsl-dev            # absl::Status, flags, strings
  libopenblas-dev        # sgemm/sgemv for the transformer
  libhiredis-dev         # Redis client for the KV store
  libmicrohttpd-dev      # the servers' Prometheus /metrics HTTP endpoint (--metrics_listen)
  redis-server           # the store itself (tests start private instances)
  libxxhash-dev          # XXH3-128: model fingerprints, cache keys, checksums
  libicu-dev             # ICU regex: Unicode classes for the byte-level BPE pre-tokenizers
  libgtest-dev nlohmann-json3-dev  # unit tests; golden JSON files; APE presets
  python3-torch python3-numpy      # independent reference (tests/reference), model recipe
  python3-grpcio python3-grpc-tools python3-yaml python3-matplotlib  # clients, e2e/deploy tests, plots
  python3-jinja2                   # tests/e2e/chat_test.py: real chat templates rendered as the oracle
  dpkg-dev libprotoc-dev           # deploy/build-grpc-cli.sh (grpc_cli from Debian's source)
  clang libclang-rt-14-dev libomp-dev  # libFuzzer targets (tests/fuzz), built with clang
  openssl                          # throwaway CAs and certificates for the TLS tests
)
# Node.js for the Node client: the machine's own node (>= 18) or Debian's.
command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 || PACKAGES+=(nodejs npm)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]} == 0)); then
  echo "install-deps: all ${#PACKAGES[@]} packages present" >&2
  exit 0
fi
echo "install-deps: installing ${missing[*]}" >&2
SUDO=""
if [[ $(id -u) != 0 ]]; then SUDO=sudo; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# The Debian package starts a system redis on 6379; apeserve never relies on it.
echo "install-deps: done" >&2
