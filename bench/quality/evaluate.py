#!/usr/bin/python3
"""Quality of APE against sequential encoding, through the real services.

For 1, 2, 4, 8, 16 and 32 documents per question, on held-out data:
exact match of SEQUENTIAL, PARALLEL without a shared prefix, PARALLEL with
the shared prefix and APE, and each parallel mode's next-token distribution
against SEQUENTIAL's (mean KL divergence, top-1 agreement) on the same
inputs. The same fidelity numbers on stories260K with story passages as
contexts. Writes bench/results/quality.{md,json} and quality_*.png.

  /usr/bin/python3 bench/quality/evaluate.py [--questions 50] [--ape-t 0.8 --ape-s 0.9]
      [--bin-dir build/bin] [--out bench/results/quality]

stories260K and its tokenizer come from tests/data ($APE_TEST_DATA).
"""
import argparse
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import ROOT, Services, answer_lead, argmax, corpus_of, cut_answer, kl, qa_examples  # noqa: E402
from apeserve_launcher import default_bin_dir, test_data_dir  # noqa: E402
from corpus import PREFIX, query_text  # noqa: E402

RESULTS = os.path.join(ROOT, "bench", "results")
DOC_COUNTS = [1, 2, 4, 8, 16, 32]
VARIANTS = [  # (name, mode, shared prefix?)
    ("SEQUENTIAL", "SEQUENTIAL", True),
    ("PARALLEL (no prefix)", "PARALLEL", False),
    ("PARALLEL", "PARALLEL", True),
    ("APE", "APE", True),
]


def evaluate_qa(svc, model_name, n_questions, T, S, log, corpus):
    records = []
    for n_docs in DOC_COUNTS:
        exs = qa_examples(n_docs, n_questions, seed=1, corpus=corpus)
        stats = {v[0]: {"em": 0, "kl": 0.0, "top1": 0} for v in VARIANTS}
        for ex in exs:
            q, answer, value, _ = ex["qa"][0]
            query = query_text(q)
            # Distributions are compared where it matters: at the answer's
            # value, after its restating words ("... answer : Neub lives in").
            lead = answer_lead(answer, value)
            expected = cut_answer(answer)
            keys = {True: svc.encode(PREFIX, ex["docs"]), False: svc.encode("", ex["docs"])}
            seq_scores = None
            for name, mode, with_prefix in VARIANTS:
                prefix = PREFIX if with_prefix else ""
                # Without the shared prefix the instruction moves into the query.
                qtext = query if with_prefix else PREFIX + " " + query
                stats[name]["em"] += int(svc.answer(prefix, keys[with_prefix], qtext, mode, T, S) == expected)
                scores = svc.score(svc.request(prefix, keys[with_prefix], qtext + " " + lead, mode, T, S))
                if name == "SEQUENTIAL":
                    seq_scores = scores
                else:
                    stats[name]["kl"] += kl(seq_scores, scores)
                    stats[name]["top1"] += int(argmax(scores) == argmax(seq_scores))
        for name, mode, with_prefix in VARIANTS:
            st = stats[name]
            rec = {"model": model_name, "mode": name, "documents": n_docs, "exact_match": st["em"] / n_questions,
                   "kl_to_sequential": 0.0 if name == "SEQUENTIAL" else st["kl"] / n_questions,
                   "top1_agreement": 1.0 if name == "SEQUENTIAL" else st["top1"] / n_questions,
                   "n_questions": n_questions, "T": T if mode == "APE" else 1.0, "S": S if mode == "APE" else 1.0}
            records.append(rec)
            log(f"{model_name} N={n_docs:2d} {name:22s} EM={rec['exact_match']:.3f} KL={rec['kl_to_sequential']:.4f} "
                f"top1={rec['top1_agreement']:.3f}")
    return records


def story_passages(svc_prefix_free_count=200, seed=7):
    """Short story passages made of the golden stories' sentences, shuffled."""
    with open(os.path.join(test_data_dir(), "stories260K.golden.json")) as f:
        golden = json.load(f)
    sents = set()
    for c in golden["cases"]:
        for s in c["text"].replace("\n", " ").split(". "):
            s = s.strip()
            if 3 < len(s) < 120:
                sents.add(" " + s.rstrip(".") + ".")
    sents = sorted(sents)
    rng = random.Random(seed)
    return [" ".join(rng.sample(sents, 2)) for _ in range(svc_prefix_free_count)]


def evaluate_stories(svc, n_questions, T, S, log):
    records = []
    passages = story_passages()
    rng = random.Random(3)
    queries = [" One day,", " Lily wanted to", " The dog", " She said,", " They were"]
    prefix = "Once upon a time"
    for n_docs in DOC_COUNTS:
        stats = {v[0]: {"kl": 0.0, "top1": 0} for v in VARIANTS}
        for i in range(n_questions):
            docs = rng.sample(passages, n_docs)
            query = queries[i % len(queries)]
            keys = {True: svc.encode(prefix, docs), False: svc.encode("", docs)}
            seq_scores = None
            for name, mode, with_prefix in VARIANTS:
                p = prefix if with_prefix else ""
                req = svc.request(p, keys[with_prefix], query if with_prefix else " " + prefix + query, mode, T, S)
                scores = svc.score(req)
                if name == "SEQUENTIAL":
                    seq_scores = scores
                else:
                    stats[name]["kl"] += kl(seq_scores, scores)
                    stats[name]["top1"] += int(argmax(scores) == argmax(seq_scores))
        for name, mode, _ in VARIANTS:
            rec = {"model": "stories260K", "mode": name, "documents": n_docs, "exact_match": None,
                   "kl_to_sequential": 0.0 if name == "SEQUENTIAL" else stats[name]["kl"] / n_questions,
                   "top1_agreement": 1.0 if name == "SEQUENTIAL" else stats[name]["top1"] / n_questions,
                   "n_questions": n_questions, "T": T if mode == "APE" else 1.0, "S": S if mode == "APE" else 1.0}
            records.append(rec)
            log(f"stories260K N={n_docs:2d} {name:22s} KL={rec['kl_to_sequential']:.4f} top1={rec['top1_agreement']:.3f}")
    return records


def write_outputs(records, out_prefix):
    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
    with open(out_prefix + ".json", "w") as f:
        json.dump(records, f, indent=1)
    lines = ["# Quality: APE against sequential encoding", "",
             "Generated by `bench/quality/evaluate.py` through the real ape-encoder and ape-decoder.", ""]
    for model in sorted({r["model"] for r in records}):
        rs = [r for r in records if r["model"] == model]
        lines += [f"## {model}", "", f"{rs[0]['n_questions']} held-out questions per row; APE T={[r for r in rs if r['mode']=='APE'][0]['T']:.2f} "
                  f"S={[r for r in rs if r['mode']=='APE'][0]['S']:.2f}.", ""]
        if rs[0]["exact_match"] is not None:
            lines += ["Exact match:", "", "| documents | " + " | ".join(v[0] for v in VARIANTS) + " | APE / SEQUENTIAL |",
                      "|---:|" + "---:|" * (len(VARIANTS) + 1)]
            for n in DOC_COUNTS:
                row = {r["mode"]: r for r in rs if r["documents"] == n}
                seq = row["SEQUENTIAL"]["exact_match"]
                ratio = f"{row['APE']['exact_match'] / seq:.2f}" if seq > 0 else "-"
                lines.append(f"| {n} | " + " | ".join(f"{row[v[0]]['exact_match']:.3f}" for v in VARIANTS) + f" | {ratio} |")
            lines.append("")
        what = ("at the answer's value (after its restating words)" if rs[0]["exact_match"] is not None
                else "after the query")
        lines += [f"Next-token distribution {what} vs SEQUENTIAL (mean KL divergence / top-1 agreement):", "",
                  "| documents | " + " | ".join(v[0] for v in VARIANTS[1:]) + " |", "|---:|" + "---:|" * (len(VARIANTS) - 1)]
        for n in DOC_COUNTS:
            row = {r["mode"]: r for r in rs if r["documents"] == n}
            lines.append(f"| {n} | " + " | ".join(f"{row[v[0]]['kl_to_sequential']:.4f} / {row[v[0]]['top1_agreement']:.2f}"
                                               for v in VARIANTS[1:]) + " |")
        lines.append("")
    with open(out_prefix + ".md", "w") as f:
        f.write("\n".join(lines))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plots", file=sys.stderr)
        return
    for model in sorted({r["model"] for r in records}):
        rs = [r for r in records if r["model"] == model]
        metrics = (["exact_match"] if rs[0]["exact_match"] is not None else []) + ["kl_to_sequential", "top1_agreement"]
        fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4))
        for ax, metric in zip(axes, metrics):
            for name, _, _ in VARIANTS:
                pts = sorted((r["documents"], r[metric]) for r in rs if r["mode"] == name)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("documents per question")
            ax.set_title(metric)
            ax.grid(alpha=0.3)
        axes[0].legend()
        fig.suptitle(f"{model}: parallel modes against SEQUENTIAL")
        fig.tight_layout()
        fig.savefig(f"{out_prefix}_{model.replace('.', '_')}.png", dpi=100)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "apeserve-qa.gguf"))
    ap.add_argument("--preset", default="", help="APE preset JSON giving T and S; default <model>.ape.json")
    ap.add_argument("--questions", type=int, default=50)
    ap.add_argument("--story-questions", type=int, default=30)
    ap.add_argument("--ape-t", type=float, default=0, help="APE temperature T; 0 = the preset's")
    ap.add_argument("--ape-s", type=float, default=0, help="APE scale S; 0 = the preset's")
    # Old spellings, kept working but not advertised.
    ap.add_argument("--T", dest="ape_t", type=float, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    ap.add_argument("--S", dest="ape_s", type=float, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    ap.add_argument("--bin-dir", default=default_bin_dir(),
                    help="folder of ape-encoder and ape-decoder (default $APE_BIN_DIR, else <repo>/build/bin)")
    ap.add_argument("--out", default=os.path.join(RESULTS, "quality"), help="output prefix for .md, .json, _*.png")
    ap.add_argument("--skip-stories", action="store_true")
    args = ap.parse_args()
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    if args.preset and not os.path.exists(args.preset):
        ap.error(f"--preset {args.preset} does not exist")
    preset = args.preset or args.model + ".ape.json"
    T, S = args.ape_t, args.ape_s
    if (not T or not S) and os.path.exists(preset):
        with open(preset) as f:
            p = json.load(f)
        T, S = T or p["temperature"], S or p["scale"]
    T, S = T or 0.9, S or 0.9
    records = []
    with Services(args.model, bin_dir=args.bin_dir, preset=args.preset or None) as svc:
        records += evaluate_qa(svc, os.path.basename(args.model).replace(".gguf", ""), args.questions, T, S, log,
                               corpus_of(args.model))
    if not args.skip_stories:
        data = test_data_dir()
        with Services(os.path.join(data, "stories260K.bin"), os.path.join(data, "tok512.bin"),
                      bin_dir=args.bin_dir) as svc:
            records += evaluate_stories(svc, args.story_questions, 0.9, 0.9, log)
    write_outputs(records, args.out)
    log(f"wrote {args.out}.md, .json and plots")


if __name__ == "__main__":
    main()
