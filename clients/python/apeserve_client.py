#!/usr/bin/python3
"""apeserve from Python: encode documents, stream an answer.

Stubs are generated from ../../proto at run time into a cache folder (never
committed; $APESERVE_PY_GEN, else <tmp>/apeserve-py-gen) with Debian's
python3-grpc-tools, when load_stubs() is first called (main() does): importing
this module runs no protoc.

  /usr/bin/python3 clients/python/apeserve_client.py --encoder 127.0.0.1:50051 \
      --decoder 127.0.0.1:50052 --prefix "..." --doc a.txt --doc b.txt --query "..."

Prints the streamed answer to stdout, usage and timings to stderr. With
--chat the server wraps prefix (the system text), documents and query in the
model's chat template (llama3, chatml or mistral-inst families): the answer
is the assistant's reply.

As a library: encode(channel, prefix, docs, chat=False) and
generate(channel, prefix, keys, query, chat=False, ...) (see each).

Several servers: --encoder / --decoder take a comma-separated list of
addresses or dns:///name:port; --round-robin (on for a list) spreads calls
over all of them.

TLS: servers started with --tls_cert/--tls_key take --tls-ca CA.pem (or --tls
for the system roots); servers with --tls_client_ca also need --tls-cert and
--tls-key (mutual TLS). Without these flags the channels are plaintext.

Request text (prefix, query, stop strings, context text and keys) is sent as
UTF-8 bytes (the API's fields are `bytes`); see utf8().
"""
import argparse
import os
import sys
import tempfile

import grpc

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_ROOT = os.path.join(HERE, "..", "..", "proto")


def load_stubs(out_dir=None):
    """Generates ape/v1 and health stubs into out_dir (again only when a
    .proto is newer than the last generation) and imports them."""
    from grpc_tools import protoc
    out_dir = out_dir or os.environ.get("APESERVE_PY_GEN") or os.path.join(tempfile.gettempdir(), "apeserve-py-gen")
    os.makedirs(out_dir, exist_ok=True)
    protos = ["ape/v1/encoder.proto", "ape/v1/decoder.proto", "ape/v1/cache.proto", "grpc/health/v1/health.proto"]
    stamp = os.path.join(out_dir, ".stamp")
    newest = max(os.path.getmtime(os.path.join(PROTO_ROOT, p)) for p in protos)
    if not os.path.exists(stamp) or os.path.getmtime(stamp) < newest:
        include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
        rc = protoc.main(["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out_dir}",
                          f"--grpc_python_out={out_dir}"] + [os.path.join(PROTO_ROOT, p) for p in protos])
        if rc != 0:
            raise RuntimeError("protoc failed")
        open(stamp, "w").close()
    if out_dir not in sys.path:
        sys.path.insert(0, out_dir)
    from ape.v1 import decoder_pb2, decoder_pb2_grpc, encoder_pb2, encoder_pb2_grpc  # noqa: E402
    return encoder_pb2, encoder_pb2_grpc, decoder_pb2, decoder_pb2_grpc


def load_cache_stubs(out_dir=None):
    """The ape.v1.Cache stubs (cache administration, served by both servers):
    (cache_pb2, cache_pb2_grpc), generated as load_stubs() does."""
    load_stubs(out_dir)
    from ape.v1 import cache_pb2, cache_pb2_grpc  # noqa: E402
    return cache_pb2, cache_pb2_grpc


def utf8(text):
    """Request text as the API's `bytes` fields take it: str -> UTF-8 bytes
    (bytes pass through). Protobuf's Python runtime also accepts these bytes
    for a `string` field holding valid UTF-8."""
    return text if isinstance(text, bytes) else text.encode("utf-8")


def channel_credentials(tls=False, tls_ca=None, tls_cert=None, tls_key=None):
    """None for plaintext; else TLS credentials: the server verified with the
    PEM CA bundle `tls_ca` (or the system roots when only `tls` is set), and
    the client certificate `tls_cert` + `tls_key` for mutual TLS."""
    if not (tls or tls_ca or tls_cert or tls_key):
        return None
    if bool(tls_cert) != bool(tls_key):
        raise ValueError("--tls-cert and --tls-key go together")

    def read(path):
        with open(path, "rb") as f:
            return f.read()
    return grpc.ssl_channel_credentials(root_certificates=read(tls_ca) if tls_ca else None,
                                        private_key=read(tls_key) if tls_key else None,
                                        certificate_chain=read(tls_cert) if tls_cert else None)


ROUND_ROBIN_CONFIG = '{"loadBalancingConfig": [{"round_robin": {}}]}'


def channel_target(address):
    """A gRPC target for `address`: "host:port" as is; a comma-separated
    list of host:port ("127.0.0.1:1,127.0.0.1:2") becomes gRPC's static list
    "ipv4:..." (or "ipv6:..." when an address is bracketed); targets with a
    scheme ("dns:///name:port", "ipv4:...", "unix:...") pass through."""
    if "," not in address or ":/" in address or address.split(":", 1)[0] in ("ipv4", "ipv6", "unix", "dns"):
        return address
    return ("ipv6:" if address.startswith("[") else "ipv4:") + address


def make_channel(address, credentials=None, server_name=None, options=(), round_robin=None):
    """A channel to `address` (see channel_target(): one address, a
    comma-separated list, or dns:///name:port): plaintext when `credentials`
    is None, else TLS (checking `server_name` in the server's certificate
    instead of the address's host, when given). round_robin=True balances
    calls over every address of the target (a list, or every address a
    dns:/// name resolves to: a Kubernetes headless Service); None = on for
    an address list, off (gRPC's pick_first) otherwise."""
    target = channel_target(address)
    options = list(options)
    if round_robin is None:
        round_robin = target != address
    if round_robin:
        options.append(("grpc.service_config", ROUND_ROBIN_CONFIG))
    if credentials is None:
        return grpc.insecure_channel(target, options=options)
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.secure_channel(target, credentials, options=options)


def add_tls_arguments(ap):
    """--tls, --tls-ca, --tls-cert, --tls-key, --tls-server-name on an argparse parser."""
    g = ap.add_argument_group("TLS (default: plaintext)")
    g.add_argument("--tls", action="store_true", help="TLS, verifying the servers with the system roots")
    g.add_argument("--tls-ca", metavar="PEM", help="TLS, verifying the servers with this CA bundle")
    g.add_argument("--tls-cert", metavar="PEM",
                   help="client certificate, for servers started with --tls_client_ca (mutual TLS; with --tls-key)")
    g.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    g.add_argument("--tls-server-name", metavar="NAME",
                   help="name to verify in the servers' certificates (default: the address's host)")


def encode(channel, prefix, docs, chat=False, dtype=0, timeout=600, stubs=None):
    """Encodes `docs` (str or bytes each) after `prefix` on the ape-encoder
    behind `channel`; returns the EncodeResponse (contexts[i].key names
    docs[i]). chat=True: `prefix` is the system text of the model's chat
    template, and the entries are valid for generate(..., chat=True) with
    the same prefix."""
    enc_pb, enc_grpc, _, _ = stubs or load_stubs()
    return enc_grpc.EncoderStub(channel).Encode(enc_pb.EncodeRequest(
        prefix=enc_pb.Segment(text=utf8(prefix)), contexts=[enc_pb.Segment(text=utf8(d)) for d in docs],
        chat=chat, dtype=dtype), timeout=timeout)


def generate(channel, prefix, keys, query, chat=False, mode="ape", max_tokens=64, temperature=0.0, stop=(),
             texts=(), dtype=0, return_prompt_ids=False, timeout=600, stubs=None):
    """Asks the ape-decoder behind `channel`: contexts by cache key (`keys`,
    as encode() returned them) and by content (`texts`, encoded on a miss),
    then `query`. chat=True wraps prefix (system text), contexts and query in
    the model's chat template. Yields the GenerateResponse messages: token
    deltas, then the final message (return_prompt_ids=True: the prompt's ids
    in final.prompt_ids)."""
    _, _, dec_pb, dec_grpc = stubs or load_stubs()
    modes = {"ape": dec_pb.MODE_APE, "parallel": dec_pb.MODE_PARALLEL, "sequential": dec_pb.MODE_SEQUENTIAL}
    req = dec_pb.GenerateRequest(
        prefix=utf8(prefix), contexts=[dec_pb.ContextRef(key=utf8(k)) for k in keys]
        + [dec_pb.ContextRef(text=utf8(t)) for t in texts], query=utf8(query), mode=modes[mode],
        max_tokens=max_tokens, stop=[utf8(s) for s in stop], sampling=dec_pb.Sampling(temperature=temperature),
        chat=chat, dtype=dtype, return_prompt_ids=return_prompt_ids)
    yield from dec_grpc.DecoderStub(channel).Generate(req, timeout=timeout)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default="127.0.0.1:50051",
                    help="ape-encoder address: host:port, a comma-separated list, or dns:///name:port")
    ap.add_argument("--decoder", default="127.0.0.1:50052",
                    help="ape-decoder address: host:port, a comma-separated list, or dns:///name:port")
    ap.add_argument("--round-robin", action="store_true", default=None,
                    help="balance calls over every address of --encoder / --decoder (on by default for a list; "
                         "use it with dns:///name to spread over every address the name resolves to)")
    ap.add_argument("--prefix", default="", help="shared prefix text")
    ap.add_argument("--doc", action="append", default=[], help="a document file, UTF-8 (repeat)")
    ap.add_argument("--query", required=True, help="the question")
    ap.add_argument("--mode", default="ape", choices=["ape", "parallel", "sequential"])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--stop", action="append", default=[], help="a stop string (repeat)")
    ap.add_argument("--chat", action="store_true",
                    help="wrap prefix (system text), documents and query in the model's chat template")
    add_tls_arguments(ap)
    args = ap.parse_args()
    try:
        creds = channel_credentials(args.tls, args.tls_ca, args.tls_cert, args.tls_key)
    except (OSError, ValueError) as e:
        ap.error(str(e))
    stubs = load_stubs()

    docs = []
    for path in args.doc:
        with open(path, encoding="utf-8") as f:
            docs.append(f.read().rstrip("\r\n"))
    # 1. Encode the documents once; they are cached under content keys.
    with make_channel(args.encoder, creds, args.tls_server_name, round_robin=args.round_robin) as ch:
        resp = encode(ch, args.prefix, docs, chat=args.chat, stubs=stubs)
    for c, path in zip(resp.contexts, args.doc):
        print(f"{c.key}\t{c.num_tokens} tokens\t{'cached' if c.already_cached else 'new'}\t{path}", file=sys.stderr)
    # 2. Ask, naming the cached contexts by key, and stream the answer.
    with make_channel(args.decoder, creds, args.tls_server_name, round_robin=args.round_robin) as ch:
        for msg in generate(ch, args.prefix, [c.key for c in resp.contexts], args.query, chat=args.chat,
                            mode=args.mode, max_tokens=args.max_tokens, temperature=args.temperature,
                            stop=args.stop, stubs=stubs):
            if msg.HasField("token"):
                sys.stdout.write(msg.token.text)
                sys.stdout.flush()
            else:
                f = msg.final
                print()
                print(f"finish={f.finish_reason} prompt={f.usage.prompt_tokens} cached={f.usage.cached_tokens} "
                      f"generated={f.usage.generated_tokens} ttft={f.timings.time_to_first_token_ms:.1f}ms "
                      f"decode={f.timings.decode_tokens_per_second:.1f}tok/s", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except grpc.RpcError as e:
        sys.exit(f"apeserve_client.py: gRPC {e.code().name}: {e.details()}")
