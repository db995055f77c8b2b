#!/usr/bin/env bash
# Builds grpc_cli from Debian's grpc source package against the system gRPC
# libraries (Debian ships the libraries but not the tool). Installs it to
# ${PREFIX:-/usr/local}/bin/grpc_cli. Idempotent: does nothing if present.
#   deploy/build-grpc-cli.sh
set -euo pipefail
PREFIX=${PREFIX:-/usr/local}
if [[ -x "$PREFIX/bin/grpc_cli" && "${FORCE:-0}" != 1 ]]; then
  echo "build-grpc-cli: $PREFIX/bin/grpc_cli already present" >&2
  exit 0
fi
SUDO=""
[[ $(id -u) != 0 ]] && SUDO=sudo
export DEBIAN_FRONTEND=noninteractive
# apt-get source needs deb-src entries.
if ! grep -rqs "deb-src" /etc/apt/sources.list /etc/apt/sources.list.d/; then
  echo "build-grpc-cli: adding a deb-src entry for bookworm" >&2
  $SUDO tee /etc/apt/sources.list.d/apeserve-src.sources >/dev/null <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  $SUDO apt-get update -qq
fi
for p in dpkg-dev libprotoc-dev libgrpc++-dev protobuf-compiler-grpc pkg-config; do
  dpkg-query -W -f='${Status}' $p 2>/dev/null | grep -q "install ok installed" ||
    $SUDO apt-get install -y -qq --no-install-recommends $p >/dev/null
done

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
apt-get source --download-only grpc >/dev/null 2>&1
tar xzf grpc_*.orig.tar.gz
SRC=$(ls -d grpc-*/ | head -1)
cd "$SRC"
GEN=gen
mkdir -p $GEN
# The reflection and metrics protos the tool talks.
protoc -I. --cpp_out=$GEN --grpc_out=$GEN --plugin=protoc-gen-grpc="$(command -v grpc_cpp_plugin)" \
  src/proto/grpc/reflection/v1alpha/reflection.proto src/proto/grpc/testing/metrics.proto
U=test/cpp/util
g++ -std=c++17 -O1 -w -I. -Iinclude -I$GEN -o grpc_cli \
  $U/grpc_cli.cc $U/cli_call.cc $U/cli_credentials.cc $U/grpc_tool.cc $U/proto_file_parser.cc \
  $U/proto_reflection_descriptor_database.cc $U/service_describer.cc $U/test_config_cc.cc \
  $GEN/src/proto/grpc/reflection/v1alpha/reflection.pb.cc $GEN/src/proto/grpc/reflection/v1alpha/reflection.grpc.pb.cc \
  $GEN/src/proto/grpc/testing/metrics.pb.cc $GEN/src/proto/grpc/testing/metrics.grpc.pb.cc \
  $(pkg-config --cflags --libs grpc++ protobuf) -lprotoc -lgrpc -lgpr -labsl_flags_parse -labsl_flags_internal \
  -labsl_flags_marshalling -labsl_flags_reflection -labsl_flags_usage -labsl_flags_usage_internal \
  -labsl_flags_config -labsl_flags_program_name -labsl_flags_private_handle_accessor -labsl_flags_commandlineflag \
  -labsl_flags_commandlineflag_internal -labsl_str_format_internal -labsl_strings -labsl_synchronization -lpthread
$SUDO install -m 0755 grpc_cli "$PREFIX/bin/grpc_cli"
echo "build-grpc-cli: installed $PREFIX/bin/grpc_cli" >&2
