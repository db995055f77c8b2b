#!/usr/bin/python3
"""A random-weight model of a real shape as a GGUF file, for load benchmarks.

Decode speed depends on the shape and the weight type, not on the values, so
a model whose weights are random but whose shape is Qwen2.5-0.5B's (24 layers,
dim 896, 14 heads of 64, 2 KV heads, FFN 4864, tied output, 151936-token
vocabulary) decodes as fast as the real one. Documents must tokenize like
text, so the tokenizer (vocabulary, merges, token types, special ids, add_bos,
chat template) is the real Qwen2 one from the vocabulary-only fixture
tests/data/families/vocab/ggml-vocab-qwen2.gguf (read with
models/recipe/gguf_io.py).

  /usr/bin/python3 bench/make_random_gguf.py --out /tmp/qwen-random.gguf
  /usr/bin/python3 bench/make_random_gguf.py --shape qwen2.5-1.5b --type f16 --out big.gguf
  /usr/bin/python3 bench/make_random_gguf.py --shape tinyllama-1.1b --type f32 --out tl.gguf

Weight types:
  q8_0 (default): GGML Q8_0 blocks written directly (a float16 scale d and 32
      int8 values q, value = d * q): the int8s are uniform draws in [-127, 127]
      and d is chosen so that every matrix has the standard deviation of its
      initialisation (1/sqrt(columns); 1 for the embedding). ~530 MB for
      Qwen2.5-0.5B, written in a few seconds with no float copy in memory.
  f16, f32: normal draws with the same deviations (~1 GB / ~2 GB).
Norm weights are 1, Q/K/V biases small normals, both F32 as in real files.

GGUF layout: common/engine/gguf.h (v3, little-endian, 32-byte alignment);
tensors are generated and written one at a time.
"""
import argparse
import os
import struct
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "models", "recipe"))
from gguf_io import ALIGN, GGUF_MAGIC, T_F32, T_STR, T_U32, encode_kv, encode_string, read_gguf  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
DEFAULT_VOCAB = os.path.join(ROOT, "tests", "data", "families", "vocab", "ggml-vocab-qwen2.gguf")

GGML_F32, GGML_F16, GGML_Q8_0 = 0, 1, 8
FILE_TYPE = {GGML_F32: 0, GGML_F16: 1, GGML_Q8_0: 7}  # llama.cpp's LLAMA_FTYPE_ALL_F32 / MOSTLY_F16 / MOSTLY_Q8_0
QK8_0 = 32  # values per Q8_0 block; a block is 2 + 32 bytes

LLAMA_SPM_VOCAB = os.path.join(ROOT, "tests", "data", "vocab", "ggml-vocab-llama-spm.gguf")

# Published dimensions (config.json of the Hugging Face checkpoints). Qwen2.5:
# architecture qwen2, Q/K/V biases, output tied to the token embedding, RoPE
# base 1e6. TinyLlama-1.1B: architecture llama, no biases, its own output
# matrix, RoPE base 1e4, Llama 2's 32,000-token SentencePiece vocabulary.
QWEN = dict(arch="qwen2", biases=True, tied=True, rope_base=1000000.0, rms_eps=1e-6, vocab=DEFAULT_VOCAB)
SHAPES = {
    "qwen2.5-0.5b": dict(QWEN, dim=896, ffn=4864, layers=24, heads=14, kv_heads=2),
    "qwen2.5-1.5b": dict(QWEN, dim=1536, ffn=8960, layers=28, heads=12, kv_heads=2),
    "tinyllama-1.1b": dict(arch="llama", biases=False, tied=False, rope_base=10000.0, rms_eps=1e-5,
                           vocab=LLAMA_SPM_VOCAB, dim=2048, ffn=5632, layers=22, heads=32, kv_heads=4),
    # Between the tiny fixtures and a real model: decodes in a few ms.
    "small": dict(QWEN, dim=256, ffn=768, layers=4, heads=8, kv_heads=2),
}


def tensor_bytes(shape, gtype):
    n = int(np.prod(shape))
    if gtype == GGML_Q8_0:
        return n // QK8_0 * (2 + QK8_0)
    return n * (2 if gtype == GGML_F16 else 4)


def random_tensor(rng, shape, gtype, std):
    """The bytes of a tensor of `shape` ([rows, cols] or [n]) with deviation `std`."""
    n = int(np.prod(shape))
    if gtype == GGML_Q8_0:
        # Uniform int8 in [-127, 127] has deviation sqrt((255^2 - 1) / 12) ~ 73.6.
        blocks = np.empty(n // QK8_0, dtype=[("d", "<f2"), ("q", "i1", QK8_0)])
        blocks["d"] = np.float16(std / 73.6)
        blocks["q"] = rng.integers(-127, 128, size=(n // QK8_0, QK8_0), dtype=np.int8)
        return blocks.tobytes()
    x = rng.standard_normal(n, dtype=np.float32) * np.float32(std)
    return x.astype(np.float16 if gtype == GGML_F16 else np.float32).tobytes()


def make_random_gguf(out, shape_name="qwen2.5-0.5b", vocab=None, wtype="q8_0", layers=None, seed=0,
                     context_length=32768):
    s = dict(SHAPES[shape_name])
    vocab = vocab or s["vocab"]
    if layers:
        s["layers"] = layers
    dim, ffn, n_layers, heads, kv_heads = s["dim"], s["ffn"], s["layers"], s["heads"], s["kv_heads"]
    head_dim = dim // heads
    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
    gtype = {"q8_0": GGML_Q8_0, "f16": GGML_F16, "f32": GGML_F32}[wtype]
    if gtype == GGML_Q8_0 and (dim % QK8_0 or ffn % QK8_0):
        raise ValueError(f"q8_0 needs dim and ffn multiples of {QK8_0}")

    vkv, _ = read_gguf(vocab)
    n_vocab = len(vkv["tokenizer.ggml.tokens"][1])
    arch = s["arch"]
    kv = {"general.architecture": (T_STR, arch, None),
          "general.name": (T_STR, f"random-{shape_name}-{wtype}", None)}
    for key, val in [("block_count", n_layers), ("context_length", context_length), ("embedding_length", dim),
                     ("feed_forward_length", ffn), ("attention.head_count", heads),
                     ("attention.head_count_kv", kv_heads)]:
        kv[f"{arch}.{key}"] = (T_U32, val, None)
    kv[f"{arch}.rope.freq_base"] = (T_F32, s["rope_base"], None)
    kv[f"{arch}.attention.layer_norm_rms_epsilon"] = (T_F32, s["rms_eps"], None)
    kv["general.file_type"] = (T_U32, FILE_TYPE[gtype], None)
    kv["general.quantization_version"] = (T_U32, 2, None)
    for key, entry in vkv.items():
        if key.startswith("tokenizer."):
            kv[key] = entry

    # (name, shape [rows, cols] or [n], ggml type, deviation; 0 = ones). A
    # tied output is token_embd itself (no output.weight), as in Qwen2.5-0.5B.
    specs = [("token_embd.weight", (n_vocab, dim), gtype, 1.0)]
    for i in range(n_layers):
        p = f"blk.{i}."
        specs.append((p + "attn_norm.weight", (dim,), GGML_F32, 0))
        for m, rows in (("q", q_dim), ("k", kv_dim), ("v", kv_dim)):
            specs.append((p + f"attn_{m}.weight", (rows, dim), gtype, dim ** -0.5))
            if s["biases"]:
                specs.append((p + f"attn_{m}.bias", (rows,), GGML_F32, 0.1))
        specs += [(p + "attn_output.weight", (dim, q_dim), gtype, q_dim ** -0.5),
                  (p + "ffn_norm.weight", (dim,), GGML_F32, 0),
                  (p + "ffn_gate.weight", (ffn, dim), gtype, dim ** -0.5),
                  (p + "ffn_up.weight", (ffn, dim), gtype, dim ** -0.5),
                  (p + "ffn_down.weight", (dim, ffn), gtype, ffn ** -0.5)]
    specs.append(("output_norm.weight", (dim,), GGML_F32, 0))
    if not s["tied"]:
        specs.append(("output.weight", (n_vocab, dim), gtype, dim ** -0.5))

    # Header: magic, version, counts, metadata, tensor infos (dims reversed:
    # dims[0] is the row length), padding to ALIGN; then each tensor's data
    # padded to ALIGN, at the offsets the infos name.
    infos, offset = [], 0
    for name, shape, t, _ in specs:
        dims = list(reversed(shape))
        infos.append(encode_string(name) + struct.pack("<I", len(dims))
                     + b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", t, offset))
        size = tensor_bytes(shape, t)
        offset += size + (-size % ALIGN)
    head = GGUF_MAGIC + struct.pack("<IQQ", 3, len(specs), len(kv)) + encode_kv(kv) + b"".join(infos)
    rng = np.random.default_rng(seed)
    tmp = out + ".tmp"
    with open(tmp, "wb") as f:
        f.write(head + b"\0" * (-len(head) % ALIGN))
        for name, shape, t, std in specs:
            if std == 0:
                data = np.ones(shape, np.float32).tobytes()
            elif t == GGML_F32 and len(shape) == 1:
                data = (std * rng.standard_normal(shape)).astype(np.float32).tobytes()
            else:
                data = random_tensor(rng, shape, t, std)
            assert len(data) == tensor_bytes(shape, t), name
            f.write(data + b"\0" * (-len(data) % ALIGN))
    os.replace(tmp, out)  # a half-written file never carries the final name
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--shape", default="qwen2.5-0.5b", choices=sorted(SHAPES))
    ap.add_argument("--type", default="q8_0", choices=["q8_0", "f16", "f32"])
    ap.add_argument("--layers", type=int, default=0, help="override the shape's layer count (0: keep)")
    ap.add_argument("--vocab", default=None,
                    help="vocabulary-only GGUF (default: the shape's: Qwen2 BPE, or Llama 2 SentencePiece for tinyllama)")
    ap.add_argument("--context-length", type=int, default=32768)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    make_random_gguf(args.out, args.shape, args.vocab, args.type, args.layers, args.seed, args.context_length)
    print(f"{args.out}: {os.path.getsize(args.out) / 2**20:.0f} MiB", file=sys.stderr)


if __name__ == "__main__":
    main()
