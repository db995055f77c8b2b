#!/usr/bin/python3
"""Trains apeserve's own retrieval QA model and exports it as GGUF.

  /usr/bin/python3 models/recipe/train.py --out models/apeserve-qa --steps 4000

Seeded and resumable: a checkpoint (model, optimizer, RNG, step) is written
every --ckpt-every steps to <out>.ckpt.pt and picked up on restart; progress
(loss, held-out accuracy) goes to stdout and <out>.log.jsonl. Training sees
SEQUENTIAL inputs only: BOS prefix documents question answer.
"""
import argparse
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from corpus import PREFIX, World, make_example, query_text  # noqa: E402
from gguf_export import write_gguf  # noqa: E402
from tokenizer import Vocab  # noqa: E402


# ---- model: Llama architecture, llama2.c-style interleaved RoPE -------------
class Block(nn.Module):
    def __init__(self, dim, hidden, n_heads, n_kv):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = n_heads, n_kv, dim // n_heads
        self.attn_norm = nn.Parameter(torch.ones(dim))
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, n_kv * self.hd, bias=False)
        self.wv = nn.Linear(dim, n_kv * self.hd, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.ffn_norm = nn.Parameter(torch.ones(dim))
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x, cos, sin, mask):
        B, T, D = x.shape
        h = rmsnorm(x, self.attn_norm)
        q = rope(self.wq(h).view(B, T, self.n_heads, self.hd), cos, sin).transpose(1, 2)
        k = rope(self.wk(h).view(B, T, self.n_kv, self.hd), cos, sin).transpose(1, 2)
        v = self.wv(h).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        rep = self.n_heads // self.n_kv
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        s = (q @ k.transpose(-1, -2)) / math.sqrt(self.hd) + mask
        a = (torch.softmax(s, -1) @ v).transpose(1, 2).reshape(B, T, D)
        x = x + self.wo(a)
        h = rmsnorm(x, self.ffn_norm)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


def rmsnorm(x, w):
    return w * (x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-5))


def rope(x, cos, sin):
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2)


class Model(nn.Module):
    def __init__(self, vocab, dim, hidden, n_layers, n_heads, n_kv, ctx, init="gpt2"):
        super().__init__()
        self.cfg = dict(dim=dim, hidden=hidden, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv, context_length=ctx)
        self.emb = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, hidden, n_heads, n_kv) for _ in range(n_layers))
        self.norm = nn.Parameter(torch.ones(dim))
        hd = dim // n_heads
        inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2).float() / hd))
        ang = torch.arange(4096).float()[:, None] * inv[None, :]
        self.register_buffer("cos", torch.cos(ang)[:, None, :], persistent=False)
        self.register_buffer("sin", torch.sin(ang)[:, None, :], persistent=False)
        self.init_weights(init)

    def init_weights(self, init):
        if init == "gpt2":  # std 0.02 everywhere (the first models)
            for p in self.parameters():
                if p.dim() == 2:
                    nn.init.normal_(p, std=0.02)
            return
        # "scaled": std 1/sqrt(fan_in), residual outputs further by
        # 1/sqrt(2 layers); at dim 128, 0.02 gives attention logits so small
        # that position-dependent heads (induction) hardly get a gradient.
        n = len(self.blocks)
        nn.init.normal_(self.emb.weight, std=1.0 / math.sqrt(self.emb.weight.shape[1]))
        for b in self.blocks:
            for lin in (b.wq, b.wk, b.wv, b.w1, b.w3):
                nn.init.normal_(lin.weight, std=1.0 / math.sqrt(lin.weight.shape[1]))
            for lin in (b.wo, b.w2):
                nn.init.normal_(lin.weight, std=1.0 / math.sqrt(lin.weight.shape[1] * 2 * n))

    def forward(self, tokens):
        B, T = tokens.shape
        x = self.emb(tokens)
        cos, sin = self.cos[:T], self.sin[:T]
        mask = torch.full((T, T), float("-inf")).triu(1)
        for b in self.blocks:
            x = b(x, cos, sin, mask)
        return rmsnorm(x, self.norm) @ self.emb.weight.T  # tied classifier


# ---- data -------------------------------------------------------------------
ANSWER, OTHER, ENTITY, COPY = 1, 0, 2, 3  # kinds of target token


def build_sample(world, vocab, rng, n_docs, n_questions, n_facts=(3, 5)):
    ex = make_example(world, rng, n_docs, n_questions, n_facts=n_facts)
    ids = [vocab.bos] + vocab.encode_words(PREFIX)
    kind = [OTHER] * len(ids)
    for d in ex["docs"]:
        di = vocab.encode_words(d)
        # A document's entity opens each of its facts: after the first one it
        # is predictable only by remembering which document this is (kind
        # ENTITY, the "current entity" the answer lookup needs too).
        kind += [ENTITY if t == di[0] and j > 0 else OTHER for j, t in enumerate(di)]
        ids += di
    for q, a, _, _ in ex["qa"]:
        qi = vocab.encode_words(query_text(q))
        ai = vocab.encode_words(a)
        ids += qi + ai
        kind += [OTHER] * len(qi) + [ANSWER] * len(ai)
    # Next-token targets: position t predicts ids[t+1]; the loss weighs each
    # target by its kind.
    return ids[:-1], ids[1:], kind[1:]


def copy_sample(word_ids, bos, rng, kinds=("run",)):
    """Induction exercises over corpus words; the targets are kind COPY,
    weighted like answers.
    "run": a random run of words (repeats allowed), then the same run again (the
    next word is the one that followed this word before: one-token
    induction, which forms abruptly after some hundred steps).
    "triples": (key, cue, value) triples, then the (key, cue) pairs again in
    another order, each followed by its value: the two-back lookup that
    "E visits V ." facts need, without the relation shortcut."""
    kind = rng.choice(kinds)
    if kind == "run":
        run = [rng.choice(word_ids) for _ in range(rng.randint(8, 60))]
        ids = [bos] + run + run
        kinds_ = [OTHER] * (1 + len(run)) + [COPY] * len(run)
    else:
        n = rng.randint(4, 20)
        keys = rng.sample(word_ids, n)
        cues = [rng.choice(word_ids[:5]) for _ in range(n)]  # five fixed "cue" words
        vals = [rng.choice(word_ids) for _ in range(n)]
        ids, kinds_ = [bos], [OTHER]
        for k, c, v in zip(keys, cues, vals):
            ids += [k, c, v]
            kinds_ += [OTHER] * 3
        for i in rng.sample(range(n), n):
            ids += [keys[i], cues[i], vals[i]]
            kinds_ += [OTHER, OTHER, COPY]
    return ids[:-1], ids[1:], kinds_[1:]


def batch(world, vocab, rng, size, max_docs, min_docs=1, questions=(1, 4), n_facts=(3, 5), copy_frac=0.0, word_ids=None,
          copy_kinds=("run",)):
    xs, ys, ks = [], [], []
    for _ in range(size):
        n = rng.randint(min(min_docs, max_docs), max_docs)
        if copy_frac > 0 and rng.random() < copy_frac:
            x, y, k = copy_sample(word_ids, vocab.bos, rng, copy_kinds)
        else:
            x, y, k = build_sample(world, vocab, rng, n, rng.randint(*questions), n_facts)
        xs.append(x)
        ys.append(y)
        ks.append(k)
    T = max(len(x) for x in xs)
    X = torch.zeros(size, T, dtype=torch.long)
    Y = torch.full((size, T), -100, dtype=torch.long)
    K = torch.full((size, T), OTHER, dtype=torch.long)
    for i, (x, y, k) in enumerate(zip(xs, ys, ks)):
        X[i, :len(x)] = torch.tensor(x)
        Y[i, :len(y)] = torch.tensor(y)
        K[i, :len(k)] = torch.tensor(k)
    return X, Y, K


@torch.no_grad()
def accuracy(model, world, vocab, n_docs, n=64, seed=999):
    """Held-out examples (a seed never used for training): is the value the
    most likely token once the answer's words before it are given?"""
    rng = random.Random(seed * 1000 + n_docs)
    correct = 0
    for _ in range(n):
        ex = make_example(world, rng, n_docs, 1)
        ids = [vocab.bos] + vocab.encode_words(PREFIX)
        for d in ex["docs"]:
            ids += vocab.encode_words(d)
        q, a, v, _ = ex["qa"][0]
        ids += vocab.encode_words(query_text(q))
        ai = vocab.encode_words(a)
        k = ai.index(vocab.encode_words(v)[0])
        logits = model(torch.tensor([ids + ai[:k]]))[0, -1]
        correct += int(logits.argmax()) == ai[k]
    return correct / n


def export(model, vocab, path, facts="varied", seed=1234):
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    tensors = [("token_embd.weight", sd["emb.weight"])]
    for l in range(model.cfg["n_layers"]):
        p = f"blocks.{l}."
        tensors += [
            (f"blk.{l}.attn_norm.weight", sd[p + "attn_norm"]),
            (f"blk.{l}.attn_q.weight", sd[p + "wq.weight"]),
            (f"blk.{l}.attn_k.weight", sd[p + "wk.weight"]),
            (f"blk.{l}.attn_v.weight", sd[p + "wv.weight"]),
            (f"blk.{l}.attn_output.weight", sd[p + "wo.weight"]),
            (f"blk.{l}.ffn_norm.weight", sd[p + "ffn_norm"]),
            (f"blk.{l}.ffn_gate.weight", sd[p + "w1.weight"]),
            (f"blk.{l}.ffn_down.weight", sd[p + "w2.weight"]),
            (f"blk.{l}.ffn_up.weight", sd[p + "w3.weight"]),
        ]
    tensors.append(("output_norm.weight", sd["norm"]))
    # The corpus it was trained on, so that evaluation asks questions the
    # same way (bench/quality/harness.py reads these).
    write_gguf(path, model.cfg, tensors, vocab, "apeserve-qa",
               extra=[("apeserve.corpus.facts", facts), ("apeserve.corpus.seed", str(seed))])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="models/apeserve-qa")
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--until", type=int, default=0, help="stop after this step (resume later)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=320)
    ap.add_argument("--max-docs", type=int, default=8)
    ap.add_argument("--min-docs", type=int, default=1, help="fewest documents per training sequence")
    ap.add_argument("--curriculum", type=int, default=1, help="1: grow the document count 1, 2, 4, max")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--facts", default="varied", choices=["varied", "uniform", "fixed3", "short", "pairs"], help="fact phrasing (corpus.World)")
    ap.add_argument("--lm-weight", type=float, default=0.1, help="weight of the loss on non-answer tokens")
    ap.add_argument("--questions", default="1,4", help="questions per training sequence: lo,hi")
    ap.add_argument("--doc-facts", default="3,5", help="facts per document: lo,hi")
    ap.add_argument("--entity-weight", type=float, default=0.0, help="weight of the loss on a document's repeated entity")
    ap.add_argument("--copy-frac", type=float, default=0.0, help="share of sequences that are induction (copy) exercises")
    ap.add_argument("--copy-kinds", default="run", help="induction exercises: run, triples (comma list)")
    ap.add_argument("--copy-warmup", type=int, default=0, help="steps of induction exercises only, before the QA task")
    ap.add_argument("--init", default="gpt2", choices=["gpt2", "scaled"], help="weight initialisation")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ckpt-every", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=100)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    world = World(seed=args.seed, style=args.facts)
    vocab = Vocab(world.words())
    # The fast encoder must equal SentencePiece BPE on corpus text.
    rng_check = random.Random(7)
    for _ in range(50):
        ex = make_example(world, rng_check, 2, 1)
        for t in ex["docs"] + [query_text(ex["qa"][0][0]), ex["qa"][0][1], PREFIX]:
            assert vocab.encode_words(t) == vocab.encode_bpe(t), t
    model = Model(len(vocab), args.dim, args.hidden, args.layers, args.heads, args.kv_heads, args.ctx, args.init)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    ckpt = args.out + ".ckpt.pt"
    log_path = args.out + ".log.jsonl"
    step, rng = 0, random.Random(args.seed)
    if os.path.exists(ckpt):
        st = torch.load(ckpt)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        step = st["step"]
        rng.setstate(st["rng"])
        torch.set_rng_state(st["torch_rng"])
        print(f"resumed at step {step}", flush=True)
    nparams = sum(p.numel() for p in model.parameters())
    print(f"vocab {len(vocab)}, params {nparams}, steps {args.steps}", flush=True)
    word_ids = sorted({vocab.encode_words(w)[0] for w in world.words()})
    questions = tuple(int(v) for v in args.questions.split(","))
    doc_facts = tuple(int(v) for v in args.doc_facts.split(","))
    t0 = time.time()
    until = args.until or args.steps
    while step < min(args.steps, until):
        # A warm start of induction exercises only, then the QA task; its
        # curriculum (one document first, then up to max_docs) counts from
        # the end of the warm start.
        qa_step = step - args.copy_warmup
        copy_frac = 1.0 if qa_step < 0 else args.copy_frac
        if args.curriculum:
            max_docs = 1 if qa_step < 150 else 2 if qa_step < 300 else 4 if qa_step < 600 else args.max_docs
        else:
            max_docs = args.max_docs
        lr = args.lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        X, Y, K = batch(world, vocab, rng, args.batch, max_docs, args.min_docs, questions, doc_facts,
                        copy_frac, word_ids, tuple(args.copy_kinds.split(",")))
        logits = model(X)
        per_tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), Y.reshape(-1), ignore_index=-100,
                                  reduction="none").view(Y.shape)
        valid = Y != -100
        # Answers and induction exercises are one pool of targets (weight 1);
        # their losses are logged apart.
        target = (K == ANSWER) | (K == COPY)
        answer_loss = per_tok[target].mean()
        lm_loss = per_tok[valid & ~target].mean()
        loss = answer_loss + args.lm_weight * lm_loss
        if args.entity_weight > 0 and (K == ENTITY).any():
            loss = loss + args.entity_weight * per_tok[K == ENTITY].mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        rec = {"step": step, "loss": round(loss.item(), 4), "answer_loss": round(answer_loss.item(), 4),
               "qa_loss": round(per_tok[K == ANSWER].mean().item(), 4) if (K == ANSWER).any() else None, "lr": lr, "max_docs": max_docs,
               "sec": round(time.time() - t0, 1)}
        if (K == COPY).any():
            rec["copy_loss"] = round(per_tok[K == COPY].mean().item(), 4)
        if step % args.eval_every == 0 or step == args.steps:
            model.eval()
            rec["acc1"] = accuracy(model, world, vocab, 1)
            rec["acc4"] = accuracy(model, world, vocab, 4)
            rec["acc8"] = accuracy(model, world, vocab, 8)
            model.train()
        if step % 20 == 0 or "acc1" in rec:
            print(json.dumps(rec), flush=True)
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        if step % args.ckpt_every == 0 or step == args.steps:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "rng": rng.getstate(),
                        "torch_rng": torch.get_rng_state()}, ckpt + ".tmp")
            os.replace(ckpt + ".tmp", ckpt)
    if step >= args.steps:
        model.eval()
        export(model, vocab, args.out + ".gguf", args.facts, args.seed)
        print(f"exported {args.out}.gguf", flush=True)


if __name__ == "__main__":
    main()
