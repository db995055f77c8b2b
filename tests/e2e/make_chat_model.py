#!/usr/bin/python3
"""A small random-weight chat model as a GGUF file, made at test time.

The shape (hyperparameter keys, tensor names) is a fixture model's
(tests/data/families/models/tiny-random-{qwen2,llama31}-F32.gguf), cut down
to `dim` (default 64: 4 heads of 16, 2 KV heads, FFN 2*dim, 2 layers); the
tokenizer (vocabulary, merges, token types, special ids, add_bos flag) and
the chat template are a real vocabulary-only GGUF's
(tests/data/families/vocab/ggml-vocab-{qwen2,llama-bpe}.gguf), so the model
speaks the real template's turn markers. Weights are seeded normal draws
(numpy), large enough that greedy picks are far from ties, stored F32 (the
engine's exact path; the files are 40-70 MB, written in a second or two).

  /usr/bin/python3 tests/e2e/make_chat_model.py --fixture F32.gguf --vocab vocab.gguf --out model.gguf

GGUF reading and writing: models/recipe/gguf_io.py.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "models", "recipe"))
from gguf_io import (ALIGN, GGML_F16, GGML_F32, GGUF_MAGIC, SCALAR, T_ARR, T_BOOL, T_F32, T_I32,  # noqa: E402,F401
                     T_STR, T_U32, T_U64, read_gguf, write_gguf)


def make_chat_model(out, fixture, vocab, dim=64, n_layers=2, seed=0, chat_template=None):
    """Writes the model to `out`. chat_template: None = the vocabulary's,
    "" = none, else this Jinja text. Returns `out`."""
    fkv, ftensors = read_gguf(fixture)
    vkv, _ = read_gguf(vocab)
    arch = fkv["general.architecture"][1]
    n_vocab = len(vkv["tokenizer.ggml.tokens"][1])
    heads, kv_heads, hidden = 4, 2, 2 * dim
    head_dim = dim // heads
    kv = {"general.architecture": (T_STR, arch, None), "general.name": (T_STR, f"chat-test-{arch}", None)}
    set_u32 = {"block_count": n_layers, "embedding_length": dim, "feed_forward_length": hidden,
               "attention.head_count": heads, "attention.head_count_kv": kv_heads, "context_length": 2048,
               "rope.dimension_count": head_dim, "vocab_size": n_vocab}
    for key, entry in fkv.items():
        if key.startswith(arch + "."):
            short = key[len(arch) + 1:]
            kv[key] = (entry[0], set_u32[short], None) if short in set_u32 else entry
    kv["general.file_type"] = (T_U32, 0, None)  # all F32
    for key, entry in vkv.items():
        if key.startswith("tokenizer.") and key != "tokenizer.chat_template":
            kv[key] = entry
    template = vkv.get("tokenizer.chat_template", (T_STR, "", None))[1] if chat_template is None else chat_template
    if template:
        kv["tokenizer.chat_template"] = (T_STR, template, None)

    rng = np.random.default_rng(seed)
    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
    shapes = {"token_embd.weight": (n_vocab, dim), "output.weight": (n_vocab, dim), "output_norm.weight": (dim,),
              "attn_norm.weight": (dim,), "ffn_norm.weight": (dim,), "attn_q.weight": (q_dim, dim),
              "attn_q.bias": (q_dim,), "attn_k.weight": (kv_dim, dim), "attn_k.bias": (kv_dim,),
              "attn_v.weight": (kv_dim, dim), "attn_v.bias": (kv_dim,), "attn_output.weight": (dim, q_dim),
              "ffn_gate.weight": (hidden, dim), "ffn_up.weight": (hidden, dim), "ffn_down.weight": (dim, hidden),
              "rope_freqs.weight": (head_dim // 2,)}
    tensors = []
    names = [n for n, _, _ in ftensors if not n.startswith("blk.")]
    layer = [n[len("blk.0."):] for n, _, _ in ftensors if n.startswith("blk.0.")]
    names = names[:1] + [f"blk.{i}.{n}" for i in range(n_layers) for n in layer] + names[1:]
    for name in names:
        shape = shapes[name.split(".", 2)[-1] if name.startswith("blk.") else name]
        if name == "rope_freqs.weight":  # Llama 3.1's factors: 1 for fast frequencies up to 8 for slow ones
            arr = np.geomspace(1.0, 8.0, shape[0])
        elif name.endswith("norm.weight"):
            arr = 1.0 + 0.05 * rng.standard_normal(shape)
        elif name.endswith(".bias"):
            arr = 0.1 * rng.standard_normal(shape)
        elif name in ("token_embd.weight", "output.weight"):
            arr = rng.standard_normal(shape)  # logits spread by ~sqrt(dim): far from ties
        elif name.endswith(("attn_output.weight", "ffn_down.weight")):
            # Blocks that outweigh the residual embedding: the next token then
            # depends on attention over the prompt, not just on the last token
            # (with a tied output, a copy of it).
            arr = 4.0 * rng.standard_normal(shape) / np.sqrt(shape[1])
        else:
            arr = rng.standard_normal(shape) / np.sqrt(shape[1])
        tensors.append((name, arr.astype(np.float32), GGML_F32))
    write_gguf(out, kv, tensors)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixture", required=True, help="tiny-random-*-F32.gguf: architecture, keys, tensor names")
    ap.add_argument("--vocab", required=True, help="vocabulary-only GGUF: tokenizer and chat template")
    ap.add_argument("--out", required=True)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chat-template-file", help="use this Jinja template instead of the vocabulary's")
    args = ap.parse_args()
    template = None
    if args.chat_template_file:
        with open(args.chat_template_file, encoding="utf-8") as f:
            template = f.read()
    make_chat_model(args.out, args.fixture, args.vocab, args.dim, args.layers, args.seed, template)


if __name__ == "__main__":
    main()
