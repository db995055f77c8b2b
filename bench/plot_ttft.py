#!/usr/bin/python3
"""Plots bench_ttft's JSON lines: time to first token against the number of
contexts, SEQUENTIAL vs APE from Redis, and the speedup.
  /usr/bin/python3 bench/plot_ttft.py bench/results/ttft.jsonl bench/results/ttft.png"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
rows = [r for r in rows if r["sequential_ttft_ms"] > 0]
n = [r["contexts"] for r in rows]
fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
a.plot(n, [r["sequential_ttft_ms"] / 1000 for r in rows], "o-", label="SEQUENTIAL (prefill everything)")
a.plot(n, [r["ape_ttft_ms"] / 1000 for r in rows], "o-", label="APE (cached contexts from Redis)")
a.set_xscale("log", base=2)
a.set_yscale("log")
a.set_xlabel(f"contexts of {rows[0]['context_tokens']} tokens")
a.set_ylabel("time to first token, s")
a.legend()
a.grid(alpha=0.3)
b.bar([str(x) for x in n], [r["sequential_ttft_ms"] / r["ape_ttft_ms"] for r in rows])
b.set_xlabel("contexts")
b.set_ylabel("speedup (SEQUENTIAL / APE)")
b.grid(alpha=0.3, axis="y")
setting = f", {rows[0]['kv_dtype']} entries" if "kv_dtype" in rows[0] else ""
fig.suptitle(f"Time to first token, {rows[0]['shape']} shape{setting}, {rows[0]['threads']} threads")
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=100)
