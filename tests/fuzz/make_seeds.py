#!/usr/bin/python3
"""Writes the fuzzers' seed corpus (tests/fuzz/corpus/<fuzzer>/): tiny valid
inputs, so that fuzzing starts past the magic bytes. Deterministic; the files
are committed, and this script says how they were made.

  /usr/bin/python3 tests/fuzz/make_seeds.py
"""
import os
import random
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
SPACE = "\u2581"


def gguf_str(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def f16_bytes(values):
    return b"".join(struct.pack("<e", v) for v in values)


def q8_0_bytes(values):
    out = b""
    for i in range(0, len(values), 32):
        block = values[i:i + 32]
        d = max(abs(v) for v in block) / 127 or 1.0
        out += struct.pack("<e", d) + bytes((round(v / d) & 0xFF) for v in block)
    return out


def tiny_gguf(matrix_type):
    """A 1-layer llama (dim 8, 2 heads, 1 KV head, FFN 32) with an 8-piece
    SentencePiece vocabulary; matrices in `matrix_type` (0 F32, 1 F16, 8 Q8_0)."""
    rng = random.Random(matrix_type)
    pieces = ["<unk>", "<s>", "</s>", SPACE, "a", "b", SPACE + "a", SPACE + "b"]
    dim, ffn, vocab = 8, 32, len(pieces)
    kv = [("general.architecture", 8, gguf_str("llama")),
          ("llama.embedding_length", 4, struct.pack("<I", dim)),
          ("llama.feed_forward_length", 4, struct.pack("<I", ffn)),
          ("llama.block_count", 4, struct.pack("<I", 1)),
          ("llama.attention.head_count", 4, struct.pack("<I", 2)),
          ("llama.attention.head_count_kv", 4, struct.pack("<I", 1)),
          ("llama.context_length", 4, struct.pack("<I", 64)),
          ("tokenizer.ggml.model", 8, gguf_str("llama")),
          ("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, vocab) + b"".join(gguf_str(p) for p in pieces)),
          ("tokenizer.ggml.scores", 9, struct.pack("<IQ", 6, vocab) + b"".join(struct.pack("<f", -i) for i in range(vocab))),
          ("tokenizer.ggml.token_type", 9, struct.pack("<IQ", 5, vocab) + struct.pack("<8i", 2, 3, 3, 1, 1, 1, 1, 1))]
    tensors = [("token_embd.weight", [dim, vocab]), ("blk.0.attn_norm.weight", [dim]),
               ("blk.0.attn_q.weight", [dim, dim]), ("blk.0.attn_k.weight", [dim, 4]),
               ("blk.0.attn_v.weight", [dim, 4]), ("blk.0.attn_output.weight", [dim, dim]),
               ("blk.0.ffn_norm.weight", [dim]), ("blk.0.ffn_gate.weight", [dim, ffn]),
               ("blk.0.ffn_down.weight", [ffn, dim]), ("blk.0.ffn_up.weight", [dim, ffn]),
               ("output_norm.weight", [dim])]
    head = struct.pack("<IIQQ", 0x46554747, 3, len(tensors), len(kv))
    for key, ty, val in kv:
        head += gguf_str(key) + struct.pack("<I", ty) + val
    data, infos = b"", b""
    for name, dims in tensors:
        n = 1
        for d in dims:
            n *= d
        values = [rng.uniform(-1, 1) for _ in range(n)]
        ty = matrix_type if len(dims) == 2 and n % 32 == 0 else 0
        blob = {0: lambda v: struct.pack(f"<{len(v)}f", *v), 1: f16_bytes, 8: q8_0_bytes}[ty](values)
        infos += gguf_str(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        infos += struct.pack("<IQ", ty, len(data))
        data += blob + b"\0" * (-len(blob) % 32)
    out = head + infos
    return out + b"\0" * (-len(out) % 32) + data


def tiny_llama2c():
    """A llama2.c checkpoint (dim 8, hidden 16, 1 layer, 2 heads, 1 KV head,
    vocab 8, seq_len 16) and its tokenizer file, as llama2c_fuzzer takes them:
    u32 model length, model bytes, tokenizer bytes."""
    rng = random.Random(7)
    dim, hidden, layers, heads, kv_heads, vocab, seq = 8, 16, 1, 2, 1, 8, 16
    head_size, kv_dim = dim // heads, dim // heads * kv_heads
    n = (vocab * dim + layers * dim + layers * dim * dim + 2 * layers * dim * kv_dim + layers * dim * dim
         + layers * dim + 3 * layers * dim * hidden + dim + seq * head_size)
    model = struct.pack("<7i", dim, hidden, layers, heads, kv_heads, vocab, seq)
    model += struct.pack(f"<{n}f", *[rng.uniform(-1, 1) for _ in range(n)])
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n", b" ", b"a", b"b", b" a", b" b"]
    tok = struct.pack("<i", 6) + b"".join(struct.pack("<fi", -i, len(p)) + p for i, p in enumerate(pieces))
    return struct.pack("<I", len(model)) + model + tok


def kv_block_seed(kind, n_tokens, dtype, first_position, dest_slot):
    """A KV block of the kv_block_fuzzer's model shape (2 layers, 1 KV head,
    head_dim 4), prefixed by the fuzzer's destination slot byte and a 16-byte
    key; the checksum is left zero (the fuzzer re-seals every input). dtype
    1 float16, 2 float32, 3 int8 (each row 4 int8 values, then a float32
    scale: kv_block_format.md)."""
    rng = random.Random(n_tokens)
    layers, kv_heads, head_dim = 2, 1, 4
    size = {1: 2, 2: 4, 3: 1}[dtype]
    row = kv_heads * head_dim * size + (4 * kv_heads if dtype == 3 else 0)
    payload_bytes = 2 * layers * n_tokens * row
    header = b"APEKV\r\n\x1a" + struct.pack("<II", 1, 96 + 4 * n_tokens) + bytes(range(16))
    header += struct.pack("<IIIIIIII", layers, kv_heads, head_dim, dtype, kind, n_tokens, first_position, 0)
    header += bytes(range(16, 32)) + struct.pack("<QQ", payload_bytes, 0)
    tokens = struct.pack(f"<{n_tokens}i", *[rng.randrange(16) for _ in range(n_tokens)])
    if dtype == 3:
        payload = b"".join(struct.pack("<4bf", *[rng.randrange(-127, 128) for _ in range(4)], rng.uniform(0, 0.02))
                           for _ in range(payload_bytes // row))
    else:
        values = [rng.uniform(-2, 2) for _ in range(payload_bytes // size)]
        payload = f16_bytes(values) if dtype == 1 else struct.pack(f"<{len(values)}f", *values)
    return bytes([dest_slot]) + bytes(16) + header + tokens + payload + bytes(16)


def write(fuzzer, name, data):
    d = os.path.join(HERE, "corpus", fuzzer)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def main():
    for ty, name in ((0, "f32"), (1, "f16"), (8, "q8_0")):
        write("gguf_fuzzer", f"tiny-{name}.gguf", tiny_gguf(ty))
    write("llama2c_fuzzer", "tiny.bin", tiny_llama2c())
    write("kv_block_fuzzer", "prefix-f16.bin", kv_block_seed(1, 5, 1, 0, 0))
    write("kv_block_fuzzer", "context-f32.bin", kv_block_seed(2, 12, 2, 5, 5))
    write("kv_block_fuzzer", "context-past-the-cache.bin", kv_block_seed(2, 60, 1, 5, 30))
    write("kv_block_fuzzer", "context-int8.bin", kv_block_seed(2, 7, 3, 5, 9))
    for i, text in enumerate(["Once upon a time", "  double  spaces\nand a newline", "caf\u00e9 \u65e5\u672c",
                              "", "\x00\xff"]):
        write("tokenizer_fuzzer", f"text{i}.txt", text.encode("utf-8", "surrogateescape"))
    # Redis replies as the decoder reads entries: HGETALL of a one-chunk
    # entry, a missing chunk, then PTTL; an error; nested arrays. The first
    # byte picks the piece size and read buffer (resp_reader_fuzzer.cc).
    write("resp_reader_fuzzer", "hgetall_pttl",
          b"\x05*4\r\n$1\r\n0\r\n$5\r\nhello\r\n$1\r\n1\r\n$-1\r\n:1000\r\n-WRONGTYPE x\r\n*0\r\n")
    write("resp_reader_fuzzer", "nested", b"\x41+OK\r\n*2\r\n*1\r\n:1\r\n$3\r\nabc\r\n")


if __name__ == "__main__":
    main()
