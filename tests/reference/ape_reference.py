#!/usr/bin/python3
"""Independent float32 PyTorch reference for SEQUENTIAL, PARALLEL and APE.

Written from docs/APE.md and llama2.c's model description only; it shares
no code with apeserve. It reads a llama2.c checkpoint and a JSON request on
stdin:

  {"model": "tests/data/stories260K.bin", "mode": "APE" | "PARALLEL" | "SEQUENTIAL",
   "T": 0.9, "S": 0.9, "prefix": [ids, BOS first], "contexts": [[ids], ...],
   "query": [ids], "generated": [ids]}

and writes {"logprobs": [...], "argmax": [...]} to stdout: for each generated
token, its log-probability given everything before it (teacher forcing), and
the most likely token at that step.

APE attention here uses the per-key closed form (docs/APE.md section 3):
  w(j in C) = exp(s_j/T) Z_C^(ST-1) / (Z_C^(ST) + Z_O),  w(j in O) = exp(s_j) / (...)
evaluated in log space, not the two-state merge apeserve uses.
"""
import json
import struct
import sys

import numpy as np
import torch


def load_llama2c(path):
    with open(path, "rb") as f:
        data = f.read()
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack("7i", data[:28])
    shared = vocab > 0
    vocab = abs(vocab)
    w = np.frombuffer(data, dtype=np.float32, offset=28)
    hd = dim // n_heads
    kv_dim = n_kv * hd
    off = 0

    def take(*shape):
        nonlocal off
        n = int(np.prod(shape))
        t = torch.from_numpy(w[off:off + n].copy()).reshape(*shape)
        off += n
        return t

    m = {"dim": dim, "hidden": hidden, "n_layers": n_layers, "n_heads": n_heads, "n_kv": n_kv, "hd": hd, "vocab": vocab}
    m["emb"] = take(vocab, dim)
    m["rms_att"] = take(n_layers, dim)
    m["wq"] = take(n_layers, dim, dim)
    m["wk"] = take(n_layers, kv_dim, dim)
    m["wv"] = take(n_layers, kv_dim, dim)
    m["wo"] = take(n_layers, dim, dim)
    m["rms_ffn"] = take(n_layers, dim)
    m["w1"] = take(n_layers, hidden, dim)
    m["w2"] = take(n_layers, dim, hidden)
    m["w3"] = take(n_layers, hidden, dim)
    m["rms_final"] = take(dim)
    take(seq_len, hd // 2)  # freq_cis_real (unused: recomputed)
    take(seq_len, hd // 2)  # freq_cis_imag
    m["wcls"] = m["emb"] if shared else take(vocab, dim)
    return m


def rmsnorm(x, w):
    return w * (x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-5))


def rope(x, pos, hd):
    """x: [T, heads, hd]; rotate pairs (2i, 2i+1) by pos * 10000^(-2i/hd)."""
    i = torch.arange(0, hd, 2, dtype=torch.float32)
    freq = 1.0 / (10000.0 ** (i / hd))
    ang = pos.float()[:, None] * freq[None, :]
    cos, sin = torch.cos(ang)[:, None, :], torch.sin(ang)[:, None, :]
    a, b = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = a * cos - b * sin
    out[..., 1::2] = a * sin + b * cos
    return out


def causal_kv(m, tokens):
    """Ordinary causal forward over `tokens` at positions 0..T-1; returns
    per-layer rotated K and V [T, n_kv, hd]."""
    T = len(tokens)
    pos = torch.arange(T)
    x = m["emb"][torch.tensor(tokens)]
    ks, vs = [], []
    for l in range(m["n_layers"]):
        h = rmsnorm(x, m["rms_att"][l])
        q = rope((h @ m["wq"][l].T).view(T, m["n_heads"], m["hd"]), pos, m["hd"])
        k = rope((h @ m["wk"][l].T).view(T, m["n_kv"], m["hd"]), pos, m["hd"])
        v = (h @ m["wv"][l].T).view(T, m["n_kv"], m["hd"])
        ks.append(k)
        vs.append(v)
        rep = m["n_heads"] // m["n_kv"]
        kk, vv = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        s = torch.einsum("thd,jhd->htj", q, kk) / m["hd"] ** 0.5
        s = s.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
        att = torch.einsum("htj,jhd->thd", torch.softmax(s, -1), vv).reshape(T, -1)
        x = x + att @ m["wo"][l].T
        h = rmsnorm(x, m["rms_ffn"][l])
        x = x + (torch.nn.functional.silu(h @ m["w1"][l].T) * (h @ m["w3"][l].T)) @ m["w2"][l].T
    return ks, vs, x


def ape_rows(m, prefix, contexts, rows, T_, S_):
    """Rows (query + generated) attending with APE to the prefix, the pooled
    contexts and the rows before them. Returns final hidden states."""
    lp = len(prefix)
    pk, pv, _ = causal_kv(m, prefix)
    ck = [[] for _ in range(m["n_layers"])]
    cv = [[] for _ in range(m["n_layers"])]
    longest = 0
    for c in contexts:
        k, v, _ = causal_kv(m, prefix + c)  # position reuse: every context at lp..
        for l in range(m["n_layers"]):
            ck[l].append(k[l][lp:])
            cv[l].append(v[l][lp:])
        longest = max(longest, len(c))
    R = len(rows)
    pos = torch.arange(R) + lp + longest  # after the LONGEST context
    x = m["emb"][torch.tensor(rows)]
    rep = m["n_heads"] // m["n_kv"]
    st = S_ * T_
    for l in range(m["n_layers"]):
        h = rmsnorm(x, m["rms_att"][l])
        q = rope((h @ m["wq"][l].T).view(R, m["n_heads"], m["hd"]), pos, m["hd"])
        k = rope((h @ m["wk"][l].T).view(R, m["n_kv"], m["hd"]), pos, m["hd"])
        v = (h @ m["wv"][l].T).view(R, m["n_kv"], m["hd"])
        ok = torch.cat([pk[l], k]).repeat_interleave(rep, 1)  # block O keys: prefix + rows
        ov = torch.cat([pv[l], v]).repeat_interleave(rep, 1)
        so = torch.einsum("thd,jhd->htj", q, ok) / m["hd"] ** 0.5
        mask = torch.zeros(R, lp + R, dtype=torch.bool)
        mask[:, lp:] = torch.triu(torch.ones(R, R, dtype=torch.bool), 1)
        so = so.masked_fill(mask, float("-inf"))
        lse_o = torch.logsumexp(so, -1)  # [h, t]
        if contexts:
            kc = torch.cat(ck[l]).repeat_interleave(rep, 1)
            vc = torch.cat(cv[l]).repeat_interleave(rep, 1)
            sc = torch.einsum("thd,jhd->htj", q, kc) / m["hd"] ** 0.5 / T_
            lse_c = torch.logsumexp(sc, -1)
            log_den = torch.logaddexp(st * lse_c, lse_o)
            wc = torch.exp(sc + ((st - 1) * lse_c - log_den)[..., None])
            wo = torch.exp(so - log_den[..., None])
            att = torch.einsum("htj,jhd->thd", wc, vc) + torch.einsum("htj,jhd->thd", wo, ov)
        else:
            att = torch.einsum("htj,jhd->thd", torch.softmax(so, -1), ov)
        x = x + att.reshape(R, -1) @ m["wo"][l].T
        h = rmsnorm(x, m["rms_ffn"][l])
        x = x + (torch.nn.functional.silu(h @ m["w1"][l].T) * (h @ m["w3"][l].T)) @ m["w2"][l].T
    return x


def main():
    torch.set_num_threads(1)
    req = json.load(sys.stdin)
    m = load_llama2c(req["model"])
    prefix, contexts, query, gen = req["prefix"], req["contexts"], req["query"], req["generated"]
    rows = query + gen[:-1] if gen else query
    with torch.no_grad():
        if req["mode"] == "SEQUENTIAL":
            prompt = prefix + [t for c in contexts for t in c]
            _, _, x = causal_kv(m, prompt + rows)
            x = x[len(prompt):]
        else:
            T_, S_ = (req["T"], req["S"]) if req["mode"] == "APE" else (1.0, 1.0)
            x = ape_rows(m, prefix, contexts, rows, T_, S_)
        logits = rmsnorm(x, m["rms_final"]) @ m["wcls"].T
        logp = torch.log_softmax(logits, -1)
    first = len(query) - 1
    out = {"logprobs": [float(logp[first + i, t]) for i, t in enumerate(gen)],
           "argmax": [int(logp[first + i].argmax()) for i in range(len(gen))]}
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
