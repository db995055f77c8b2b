#!/usr/bin/python3
"""APE calibration, as the paper does it: search T and S over 0.1..1.0 in
steps of 0.1 on a validation split (questions never used for evaluation),
by exact match (ties: lower mean KL to SEQUENTIAL), and store the winner as
the model's preset <model>.ape.json, which ape-decoder uses when a request
gives no T or S. The full 10 x 10 grid is searched (a superset of the
paper's greedy search); cached contexts are encoded once and reused.

  /usr/bin/python3 bench/quality/calibrate.py [--docs 8] [--questions 30]
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import ROOT, Services, corpus_of, kl, qa_examples  # noqa: E402
from corpus import PREFIX, query_text  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "apeserve-qa.gguf"))
    ap.add_argument("--docs", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--questions", type=int, default=30)
    ap.add_argument("--out", default="", help="preset path; default <model>.ape.json")
    args = ap.parse_args()
    grid = [round(0.1 * i, 1) for i in range(1, 11)]
    corpus = corpus_of(args.model)
    svc = Services(args.model)
    try:
        cases = []
        for n in args.docs:
            for ex in qa_examples(n, args.questions, seed=2, corpus=corpus):  # validation split
                q, answer, value, _ = ex["qa"][0]
                lead = query_text(q) + " " + answer[:answer.index(" " + value + " ")]
                keys = svc.encode(PREFIX, ex["docs"])
                seq = svc.score(svc.request(PREFIX, keys, lead, "SEQUENTIAL"))
                cases.append((keys, query_text(q), lead, answer[:-2].strip(), seq))
        results = []
        for T in grid:
            for S in grid:
                em, div = 0, 0.0
                for keys, query, lead, answer, seq in cases:
                    req = svc.request(PREFIX, keys, query, "APE", T, S, max_tokens=12, stop=[" ."])
                    em += int(svc.generate(req).strip() == answer)
                    div += kl(seq, svc.score(svc.request(PREFIX, keys, lead, "APE", T, S)))
                results.append({"T": T, "S": S, "exact_match": em / len(cases), "kl": div / len(cases)})
                print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    finally:
        svc.close()
    best = max(results, key=lambda r: (r["exact_match"], -r["kl"]))
    preset = {"temperature": best["T"], "scale": best["S"], "prefix_newlines": 0,
              "source": f"bench/quality/calibrate.py: grid 0.1..1.0, {len(cases)} validation questions "
                        f"({'/'.join(map(str, args.docs))} documents), EM {best['exact_match']:.3f}, KL {best['kl']:.4f}"}
    out = args.out or args.model + ".ape.json"
    with open(out, "w") as f:
        json.dump(preset, f, indent=2)
        f.write("\n")
    with open(os.path.join(ROOT, "bench", "results", "calibration.json"), "w") as f:
        json.dump({"best": best, "grid": results}, f, indent=1)
    print(f"preset T={best['T']} S={best['S']} (EM {best['exact_match']:.3f}) -> {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
