#!/usr/bin/python3
"""Widens a Llama GGUF (F32) with zero padding so that every matrix row is a
whole number of 256-element blocks, the row unit of the K-quant types (Q4_K,
Q6_K), without changing what the model computes.

apeserve-qa has dim 128, FFN 384 and 4 heads of 32: no row of it can be
Q4_K, so `apectl quantize --type Q4_K` falls back to Q8_0 everywhere. The
widened model has dim 256, FFN 512 and 8 heads of 32 (2 KV heads as before):

- residual stream: dims 128..255 are zero in the embedding and in every
  matrix that writes the stream (attn_output, ffn_down rows), so they stay
  zero through every layer;
- RMSNorm: the mean of squares over 256 dims is half the mean over 128,
  so every norm weight is divided by sqrt(2) and epsilon is halved:
  x / sqrt(m/2 + eps/2) * w/sqrt(2) == x / sqrt(m + eps) * w; the pad dims'
  weights are 0;
- attention: the real heads keep their KV heads. With 8 heads over 2 KV
  heads, heads 0-3 read KV head 0 and 4-7 KV head 1, so real heads 0, 1 go
  to 0, 1 and real heads 2, 3 to 4, 5; heads 2, 3, 6, 7 have zero queries
  (uniform attention) and zero columns in attn_output (no effect);
- FFN: gate/up rows 384..511 are zero, so SiLU(0) * 0 = 0 reaches the zero
  columns 384..511 of ffn_down.

The logits equal the original's up to float rounding: tests/e2e/widen_test.py
requires the same greedy ids from both files and every matrix of the widened
file in Q4_K after `apectl quantize --type Q4_K` (models/README.md, "Widened").

  /usr/bin/python3 models/recipe/widen.py --in models/apeserve-qa.gguf --out /tmp/apeserve-qa-w256.gguf
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gguf_io import GGML_F32, T_F32, T_STR, T_U32, read_f32_tensors, read_gguf, write_gguf  # noqa: E402

BLOCK = 256


def round_up(n, m):
    return (n + m - 1) // m * m


def widen(src, out):
    kv, infos = read_gguf(src)
    t = read_f32_tensors(src)
    arch = kv["general.architecture"][1]
    if arch != "llama":
        raise SystemExit(f"{src}: architecture {arch}; only llama is widened")
    u = lambda k: kv[f"llama.{k}"][1]  # noqa: E731
    dim, hidden, heads, kv_heads = u("embedding_length"), u("feed_forward_length"), u("attention.head_count"), u(
        "attention.head_count_kv")
    head_dim = dim // heads
    new_dim, new_hidden = round_up(dim, BLOCK), round_up(hidden, BLOCK)
    new_heads = new_dim // head_dim
    if new_heads % kv_heads:
        raise SystemExit(f"{new_heads} heads do not group evenly over {kv_heads} KV heads")
    group, new_group = heads // kv_heads, new_heads // kv_heads
    # Real head h (KV head h // group, index h % group inside its group) -> its slot in the widened model.
    head_slot = [(h // group) * new_group + h % group for h in range(heads)]
    norm_scale = np.float32(np.sqrt(dim / new_dim))

    def pad(a, shape):
        z = np.zeros(shape, np.float32)
        z[tuple(slice(0, n) for n in a.shape)] = a
        return z

    def place_heads_rows(w):  # [heads*head_dim][cols] -> [new_heads*head_dim][cols]
        z = np.zeros((new_heads * head_dim, w.shape[1]), np.float32)
        for h, s in enumerate(head_slot):
            z[s * head_dim:(s + 1) * head_dim] = w[h * head_dim:(h + 1) * head_dim]
        return z

    def place_heads_cols(w):  # [rows][heads*head_dim] -> [rows][new_heads*head_dim]
        z = np.zeros((w.shape[0], new_heads * head_dim), np.float32)
        for h, s in enumerate(head_slot):
            z[:, s * head_dim:(s + 1) * head_dim] = w[:, h * head_dim:(h + 1) * head_dim]
        return z

    tensors = []
    for name, _, _ in infos:
        a = t[name]
        short = name.split(".", 2)[-1] if name.startswith("blk.") else name
        if short in ("token_embd.weight", "output.weight"):
            a = pad(a, (a.shape[0], new_dim))
        elif short.endswith("norm.weight"):
            a = pad(a * norm_scale, (new_dim,))
        elif short == "attn_q.weight":
            a = place_heads_rows(pad(a, (a.shape[0], new_dim)))
        elif short in ("attn_k.weight", "attn_v.weight"):
            a = pad(a, (a.shape[0], new_dim))
        elif short == "attn_output.weight":
            a = pad(place_heads_cols(a), (new_dim, new_heads * head_dim))
        elif short in ("ffn_gate.weight", "ffn_up.weight"):
            a = pad(a, (new_hidden, new_dim))
        elif short == "ffn_down.weight":
            a = pad(a, (new_dim, new_hidden))
        else:
            raise SystemExit(f"{src}: tensor {name} is not one widen.py knows")
        tensors.append((name, a, GGML_F32))

    kv = dict(kv)
    kv["llama.embedding_length"] = (T_U32, new_dim, None)
    kv["llama.feed_forward_length"] = (T_U32, new_hidden, None)
    kv["llama.attention.head_count"] = (T_U32, new_heads, None)
    eps = kv["llama.attention.layer_norm_rms_epsilon"][1]
    kv["llama.attention.layer_norm_rms_epsilon"] = (T_F32, eps * dim / new_dim, None)
    kv["general.name"] = (T_STR, f"{kv['general.name'][1]}-w{new_dim}", None)
    write_gguf(out, kv, tensors)
    print(f"{out}: dim {dim}->{new_dim}, FFN {hidden}->{new_hidden}, heads {heads}->{new_heads} "
          f"(real heads at {head_slot}), RMSNorm eps {eps:g}->{eps * dim / new_dim:g}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--in", dest="src", required=True, help="a llama GGUF with F32 (or F16) tensors")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    widen(args.src, args.out)


if __name__ == "__main__":
    main()
