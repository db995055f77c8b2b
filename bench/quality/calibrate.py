#!/usr/bin/python3
"""APE calibration, as the paper does it: search T and S over 0.1..1.0 in
steps of 0.1 on a validation split (questions never used for evaluation),
by exact match (ties: lower mean KL to SEQUENTIAL), and store the winner as
the model's preset <model>.ape.json, which ape-decoder uses when a request
gives no T or S. The full 10 x 10 grid is searched (a superset of the
paper's greedy search); cached contexts are encoded once and reused.

  /usr/bin/python3 bench/quality/calibrate.py [--docs 8] [--questions 30]
      [--out PRESET.json] [--grid-out GRID.json] [--bin-dir build/bin]

The preset goes to --out (default <model>.ape.json); the whole grid goes to
--grid-out (default bench/results/calibration.json, or <out>.grid.json
beside an explicit --out, so a trial run leaves bench/results alone).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import ROOT, Services, answer_lead, corpus_of, cut_answer, kl, qa_examples  # noqa: E402
from apeserve_launcher import default_bin_dir  # noqa: E402
from corpus import PREFIX, query_text  # noqa: E402

GRID = [round(0.1 * i, 1) for i in range(1, 11)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "apeserve-qa.gguf"))
    ap.add_argument("--docs", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--questions", type=int, default=30)
    ap.add_argument("--grid", type=float, nargs="+", default=GRID,
                    help="values tried for both T and S (default 0.1 .. 1.0 in steps of 0.1)")
    ap.add_argument("--out", default="", help="preset path; default <model>.ape.json")
    ap.add_argument("--grid-out", default="", help="every grid point's scores; default "
                    "bench/results/calibration.json, or <out>.grid.json when --out is given")
    ap.add_argument("--bin-dir", default=default_bin_dir(),
                    help="folder of ape-encoder and ape-decoder (default $APE_BIN_DIR, else <repo>/build/bin)")
    args = ap.parse_args()
    out = args.out or args.model + ".ape.json"
    grid_out = args.grid_out or (os.path.splitext(args.out)[0] + ".grid.json" if args.out
                                 else os.path.join(ROOT, "bench", "results", "calibration.json"))
    grid = args.grid
    corpus = corpus_of(args.model)
    with Services(args.model, bin_dir=args.bin_dir) as svc:
        cases = []
        for n in args.docs:
            for ex in qa_examples(n, args.questions, seed=2, corpus=corpus):  # validation split
                q, answer, value, _ = ex["qa"][0]
                lead = query_text(q) + " " + answer_lead(answer, value)
                keys = svc.encode(PREFIX, ex["docs"])
                seq = svc.score(svc.request(PREFIX, keys, lead, "SEQUENTIAL"))
                cases.append((keys, query_text(q), lead, cut_answer(answer), seq))
        results = []
        for T in grid:
            for S in grid:
                em, div = 0, 0.0
                for keys, query, lead, expected, seq in cases:
                    em += int(svc.answer(PREFIX, keys, query, "APE", T, S) == expected)
                    div += kl(seq, svc.score(svc.request(PREFIX, keys, lead, "APE", T, S)))
                results.append({"T": T, "S": S, "exact_match": em / len(cases), "kl": div / len(cases)})
                print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    best = max(results, key=lambda r: (r["exact_match"], -r["kl"]))
    span = "0.1..1.0" if grid == GRID else "/".join(f"{v:g}" for v in grid)
    preset = {"temperature": best["T"], "scale": best["S"],
              "source": f"bench/quality/calibrate.py: grid {span}, {len(cases)} validation questions "
                        f"({'/'.join(map(str, args.docs))} documents), EM {best['exact_match']:.3f}, KL {best['kl']:.4f}"}
    for path in (out, grid_out):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(preset, f, indent=2)
        f.write("\n")
    with open(grid_out, "w") as f:
        json.dump({"best": best, "grid": results}, f, indent=1)
    print(f"preset T={best['T']} S={best['S']} (EM {best['exact_match']:.3f}) -> {out}; grid -> {grid_out}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
