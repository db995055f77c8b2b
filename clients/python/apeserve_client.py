#!/usr/bin/python3
"""apeserve from Python: encode documents, stream an answer.

Stubs are generated from ../../proto at run time into a cache folder (never
committed; $APESERVE_PY_GEN, else <tmp>/apeserve-py-gen) with Debian's
python3-grpc-tools, when load_stubs() is first called (main() does): importing
this module runs no protoc.

  /usr/bin/python3 clients/python/apeserve_client.py --encoder 127.0.0.1:50051 \
      --decoder 127.0.0.1:50052 --prefix "..." --doc a.txt --doc b.txt --query "..."

Prints the streamed answer to stdout, usage and timings to stderr.
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
    protos = ["ape/v1/encoder.proto", "ape/v1/decoder.proto", "grpc/health/v1/health.proto"]
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default="127.0.0.1:50051")
    ap.add_argument("--decoder", default="127.0.0.1:50052")
    ap.add_argument("--prefix", default="")
    ap.add_argument("--doc", action="append", default=[], help="a document file (repeat)")
    ap.add_argument("--query", required=True)
    ap.add_argument("--mode", default="ape", choices=["ape", "parallel", "sequential"])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--stop", action="append", default=[])
    args = ap.parse_args()
    enc_pb, enc_grpc, dec_pb, dec_grpc = load_stubs()

    docs = []
    for path in args.doc:
        with open(path, encoding="utf-8") as f:
            docs.append(f.read().rstrip("\r\n"))
    # 1. Encode the documents once; they are cached under content keys.
    with grpc.insecure_channel(args.encoder) as ch:
        resp = enc_grpc.EncoderStub(ch).Encode(enc_pb.EncodeRequest(
            prefix=enc_pb.Segment(text=args.prefix), contexts=[enc_pb.Segment(text=d) for d in docs]), timeout=600)
    for c, path in zip(resp.contexts, args.doc):
        print(f"{c.key}\t{c.num_tokens} tokens\t{'cached' if c.already_cached else 'new'}\t{path}", file=sys.stderr)
    # 2. Ask, naming the cached contexts by key, and stream the answer.
    mode = {"ape": dec_pb.MODE_APE, "parallel": dec_pb.MODE_PARALLEL, "sequential": dec_pb.MODE_SEQUENTIAL}[args.mode]
    req = dec_pb.GenerateRequest(prefix=args.prefix, contexts=[dec_pb.ContextRef(key=c.key) for c in resp.contexts],
                                 query=args.query, mode=mode, max_tokens=args.max_tokens, stop=args.stop,
                                 sampling=dec_pb.Sampling(temperature=args.temperature))
    with grpc.insecure_channel(args.decoder) as ch:
        for msg in dec_grpc.DecoderStub(ch).Generate(req, timeout=600):
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
    main()
