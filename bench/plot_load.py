#!/usr/bin/python3
"""Plots bench/run_load.py's records: aggregate tokens/s and inter-token
latency (p50, p99) against the number of concurrent streams, with the issue 14
targets (tokens/s >= 4x one stream's at 8 streams; ITL p99 <= 3x one stream's).
  /usr/bin/python3 bench/plot_load.py bench/results/load.json bench/results/load.png"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

records = sorted(json.load(open(sys.argv[1])), key=lambda r: r["streams"])
n = [r["streams"] for r in records]
one = next((r for r in records if r["streams"] == 1), None)
fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))

a.plot(n, [r["tokens_per_second"] for r in records], "o-", label="measured")
if one:
    a.plot(n, [one["tokens_per_second"] * k for k in n], ":", color="gray", label="linear in streams")
    a.scatter([8], [4 * one["tokens_per_second"]], marker="*", s=120, color="tab:red", zorder=3,
              label="target at 8 streams (4x)")
a.set_xscale("log", base=2)
a.set_xticks(n, [str(k) for k in n])
a.set_xlabel("concurrent streams")
a.set_ylabel("aggregate tokens/s")
a.set_ylim(bottom=0)
a.set_title("decode throughput")
a.grid(alpha=0.3)
a.legend(fontsize=8)

b.plot(n, [r["itl_p99_ms"] for r in records], "o-", label="ITL p99")
b.plot(n, [r["itl_p50_ms"] for r in records], "o--", label="ITL p50")
if one:
    b.axhline(3 * one["itl_p99_ms"], color="tab:red", ls=":", label="target: 3x one stream's p99")
b.set_xscale("log", base=2)
b.set_xticks(n, [str(k) for k in n])
b.set_yscale("log")
b.set_xlabel("concurrent streams")
b.set_ylabel("inter-token latency, ms")
b.set_title("inter-token latency")
b.grid(alpha=0.3, which="both")
b.legend(fontsize=8)

model = records[0].get("model", "") if records else ""
fig.suptitle(f"bench_load: {model}", fontsize=10)
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=110)
