#!/usr/bin/python3
"""Does int8 KV (KV_DTYPE_INT8: a byte a value, a scale per KV head and
token) answer as float16 does? The same held-out questions of the project
model (models/apeserve-qa.gguf), each encoded once in each dtype, answered
with APE as the decoder serves it (its preset's T and S); per document
count: exact match in both dtypes, how often the two answers are the same
string, and the KL divergence between the two next-token distributions at
the answer's value (float16 as the reference). Writes
bench/results/kv_dtype.md and .json.

    /usr/bin/python3 bench/quality/kv_dtype.py --docs 8 32 --questions 500
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (HELDOUT, ROOT, ANSWER_MAX_TOKENS, ANSWER_STOP, Services, answer_lead,  # noqa: E402
                     corpus_of, cut_answer, kl, progress_logger, qa_examples, stubs, utf8)
from apeserve_launcher import default_bin_dir  # noqa: E402
from corpus import PREFIX, query_text  # noqa: E402

DTYPES = ("FLOAT16", "INT8")


def encode(svc, docs, dtype):
    enc_pb = stubs()[0]
    r = svc.enc.Encode(enc_pb.EncodeRequest(prefix=enc_pb.Segment(text=utf8(PREFIX)),
                                            contexts=[enc_pb.Segment(text=utf8(d)) for d in docs],
                                            dtype=getattr(enc_pb, "KV_DTYPE_" + dtype)), timeout=600)
    return [c.key for c in r.contexts], sum(c.stored_bytes for c in r.contexts)


def run_question(svc, ex):
    enc_pb = stubs()[0]  # KvDtype is the encoder API's enum
    q, answer, value, _ = ex["qa"][0]
    query, lead = query_text(q), answer_lead(answer, value)
    out = {"expected": cut_answer(answer)}
    for dtype in DTYPES:
        keys, stored = encode(svc, ex["docs"], dtype)
        req = svc.request(PREFIX, keys, query, "APE", max_tokens=ANSWER_MAX_TOKENS, stop=[ANSWER_STOP])
        req.dtype = getattr(enc_pb, "KV_DTYPE_" + dtype)
        text, _ = svc.generate_final(req)
        score = svc.request(PREFIX, keys, query + " " + lead, "APE")
        score.dtype = req.dtype
        out[dtype] = {"answer": cut_answer(text), "stored_bytes": stored,
                      "logprobs": svc.score_full(score)[0]}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "apeserve-qa.gguf"))
    ap.add_argument("--docs", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--questions", type=int, default=500, help="held-out questions per document count")
    ap.add_argument("--bin-dir", default=default_bin_dir())
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "kv_dtype"))
    ap.add_argument("--log", default="")
    args = ap.parse_args()
    log = progress_logger(args.log)
    rows = []
    with Services(args.model, bin_dir=args.bin_dir) as svc:
        for n_docs in args.docs:
            t0 = time.time()
            exact = {d: 0 for d in DTYPES}
            same, kls, stored = 0, [], {d: 0 for d in DTYPES}
            exs = qa_examples(n_docs, args.questions, seed=HELDOUT, corpus=corpus_of(args.model))
            for i, ex in enumerate(exs):
                r = run_question(svc, ex)
                for d in DTYPES:
                    exact[d] += r[d]["answer"] == r["expected"]
                    stored[d] += r[d]["stored_bytes"]
                same += r["FLOAT16"]["answer"] == r["INT8"]["answer"]
                kls.append(kl(r["FLOAT16"]["logprobs"], r["INT8"]["logprobs"]))
                if (i + 1) % 50 == 0:
                    log(f"{n_docs} documents: {i + 1}/{len(exs)} questions, exact float16 {exact['FLOAT16']} "
                        f"int8 {exact['INT8']}, same answer {same}, {time.time() - t0:.0f} s")
            n = len(exs)
            rows.append({"documents": n_docs, "questions": n,
                         "exact_float16": exact["FLOAT16"] / n, "exact_int8": exact["INT8"] / n,
                         "same_answer": same / n, "kl_mean": statistics.fmean(kls), "kl_max": max(kls),
                         "bytes_ratio": stored["INT8"] / stored["FLOAT16"]})
            log(f"{n_docs} documents done: {rows[-1]}")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    with open(args.out + ".json", "w") as f:
        json.dump({"model": os.path.basename(args.model), "records": rows}, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write("# int8 KV entries against float16: answers (`bench/quality/kv_dtype.py`)\n\n")
        f.write(f"{os.path.basename(args.model)}, held-out questions, APE with the decoder's preset; "
                f"written {time.strftime('%Y-%m-%d %H:%M')}, load {load}. KL: of the int8 next-token "
                "distribution from the float16 one, at the answer's value.\n\n")
        f.write("| documents | questions | exact match, float16 | exact match, int8 | same answer | "
                "KL mean | KL max | int8 bytes / float16 bytes |\n|---:|---:|---:|---:|---:|---:|---:|---:|\n")
        for r in rows:
            f.write(f"| {r['documents']} | {r['questions']} | {r['exact_float16']:.3f} | {r['exact_int8']:.3f} | "
                    f"{r['same_answer']:.3f} | {r['kl_mean']:.2e} | {r['kl_max']:.2e} | {r['bytes_ratio']:.3f} |\n")
    log(f"wrote {args.out}.md and .json")


if __name__ == "__main__":
    main()
