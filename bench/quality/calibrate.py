#!/usr/bin/python3
"""APE calibration by number of contexts: for each document count of a
validation split (questions never used for evaluation), search T and S and
keep the best; the bests become the rows of a version-2 preset
<model>.ape.json, which ape-decoder interpolates per request (docs/APE.md,
"Choosing T and S").

  /usr/bin/python3 bench/quality/calibrate.py [--docs 2 3 4 8 16 32 48 64]
      [--questions 200] [--questions-for 2=1000 3=2000 4=2000 8=3000 ...]
      [--packed-docs 32 64 --pack 4] [--out PRESET.json] [--grid-out GRID.json]
      [--bin-dir build/bin] [--cache FILE] [--log FILE]

What one grid cell costs: one Score RPC per question (the next-token
distribution at the answer's value, after its restating words: "question :
what city does Neub visit ? answer : Neub visits" -> " Quenmar"), with the
contexts encoded once per question and reused by every cell. A cell records
  acc  - the value is the most likely next token (exact match of the value,
         teacher-forced through the restating words),
  nll  - mean -log p(value),
  kl   - mean KL(SEQUENTIAL || APE) over the questions whose SEQUENTIAL
         prompt fits the model's trained window (n_kl of them).
Questions: the VALIDATION split of harness.qa_examples (evaluate.py reports
on HELDOUT), --questions per document count, --questions-for where more are
needed. The row then depends on where the group is:
  Inside the trained window (at least half the questions' SEQUENTIAL
  prompts fit; 2-16 documents here) the objective is KL to SEQUENTIAL, and
  the search is --kl-t-grid x --kl-s-grid (plus T = S = 1, which IS
  PARALLEL, and the previous fixed preset), then the 3 x 3 neighbourhood of
  the leader at half the steps. Each cell gets the paired per-question KL
  difference to T = S = 1 and its upper confidence bound, kl_ucb = mean +
  z standard errors, z one-sided at --kl-alpha Bonferroni-corrected over
  the cells searched (about 2.9 for 30 cells; --kl-z to set it). The row
  stays at T = S = 1 unless some cell has kl_ucb < 0 (closer to SEQUENTIAL
  than PARALLEL beyond the noise): then those cells run through Generate,
  smallest kl_ucb first, and the row is the first whose exact match is not
  below the previous fixed preset's by more than --kl-em-tolerance (default
  one binomial standard error); then the neighbourhood of that pick at half
  steps, and the pick again. (The 200-question rows of 2026-11-27, picked
  as the smallest mean + one standard error of about 88 cells, were the
  winner's curse: closer by 0.08 on validation, not at all on held-out.)
  Outside it the objective is exact match: the search is --t-grid x
  --s-grid and the leader's neighbourhood, every cell within
  --generate-margin of the best acc (up to --em-generate-top) runs through
  Generate, and the row is the best exact match (ties: nll), unless it
  beats the previous fixed preset by one binomial standard error or less:
  then the row stays at the fixed preset. The teacher-forced acc cannot see
  a wrong word before the value: with many contexts a large S*T draws the
  attention that copies the entity from the question into the contexts,
  and the answer goes wrong while the value would still be right.

Keying. Documents hold 3-5 facts, so within one document count the cached
tokens vary little and the two possible keys (contexts, cached tokens) are
almost collinear. The --packed-docs groups separate them: D documents packed
4 to a context (D/4 contexts, the tokens of D documents). The table keyed by
contexts and the table keyed by tokens each predict a T, S for those
requests; both predictions are run as cells (and through Generate; with
--packed-grid the packed groups get the whole search as well). The preset
is keyed by contexts unless the tokens' prediction has the better exact
match by more than one binomial standard error: the contexts key gives a
single context T = S = 1, which is exactly sequential encoding; the tokens
table gets a first row T = S = 1 up to the largest single validation
document for the same reason. Keyed by tokens, each group's row is held
over the span of its requests' tokens (token_rows), so the requests a row
was fitted on all get it.

Progress: one line per grid cell on stderr. Every finished cell is appended
to --cache (default $TMPDIR/apeserve-quality/calibration.jsonl), keyed by
model, group, questions and (T, S): a rerun skips finished cells, and a
group whose cells are all cached is not even encoded. Outputs: the preset
(--out, default <model>.ape.json), every cell (--grid-out, default
bench/results/calibration.json) and a heat map per group
(<grid-out dir>/calibration_<group>.png, python3-matplotlib).
"""
import argparse
import json
import math
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (ROOT, VALIDATION, Services, answer_lead, corpus_of, cut_answer, kl,  # noqa: E402
                     open_result_cache, progress_logger, qa_examples)
from apeserve_launcher import default_bin_dir  # noqa: E402
from corpus import PREFIX, query_text  # noqa: E402

# Outside the trained window (32+ documents, exact match): the best cells of
# the wider search of 2026-11-27 (T 0.3-1.4 x S 0.8-1.1) were all at T 0.5-0.8,
# S 0.9-1.05, so the search keeps a margin around that.
T_GRID = [0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
S_GRID = [0.85, 0.9, 0.95, 1.0, 1.05]
# Inside the trained window the question is whether any cell is closer to
# SEQUENTIAL than T = S = 1 beyond the noise, and the closest cells are near
# (1, 1) or at T above 1: a smaller grid there (fewer cells, a smaller
# multiple-comparison correction, more questions per cell for the time).
KL_T_GRID = [1.0, 1.1, 1.25, 1.45]
KL_S_GRID = [0.85, 0.9, 0.925, 0.95, 1.0]
FIXED = (0.8, 0.9)  # the version-1 preset this replaces
MIN_P, MAX_P = 0.05, 2.0  # kMinApeParam, kMaxApeParam (common/engine/ape_preset.h)


def interpolate(rows, x):
    """The preset's rule (ApePreset::For): linear in log2(x) between the
    rows around x, clamped to the first / last row. rows: [(key, T, S)]."""
    if x <= rows[0][0]:
        return rows[0][1], rows[0][2]
    if x >= rows[-1][0]:
        return rows[-1][1], rows[-1][2]
    for (a, ta, sa), (b, tb, sb) in zip(rows, rows[1:]):
        if a <= x <= b:
            f = (math.log2(x) - math.log2(a)) / (math.log2(b) - math.log2(a))
            return ta + f * (tb - ta), sa + f * (sb - sa)
    raise AssertionError("unreachable")


def token_rows(fits):
    """The tokens table from the fitted groups, [(sequential stats with
    min/median/max_tokens, T, S)] by increasing document count: each group's
    T, S held over the span of its validation requests' tokens (a row at each
    end), so every request like the ones a row was fitted on gets that row,
    not a blend with its neighbour's (with one row at the median, half of
    the 8-document requests were interpolated towards the 4- or the
    16-document row). Where neighbouring spans overlap (2, 3 and 4 documents:
    24-40, 36-60, 48-80 tokens) they are cut at the geometric mean of the two
    medians; between spans T and S are interpolated as everywhere."""
    rows = []
    meds = [f[0]["median_tokens"] for f in fits]
    for i, (seq, T, S) in enumerate(fits):
        if i and meds[i] <= meds[i - 1]:
            continue  # a group no longer than the one before adds nothing
        lo, hi = seq.get("min_tokens", meds[i]), seq.get("max_tokens", meds[i])
        if i:
            lo = max(lo, math.floor(math.sqrt(meds[i - 1] * meds[i])) + 1)
        if i + 1 < len(fits) and meds[i + 1] > meds[i]:
            hi = min(hi, math.floor(math.sqrt(meds[i] * meds[i + 1])))
        lo, hi = min(lo, meds[i]), max(hi, meds[i])
        if rows and lo <= rows[-1][0]:
            lo = meds[i]
        rows += [(lo, T, S)] + ([(hi, T, S)] if hi > lo else [])
    return rows


class Group:
    """Validation questions with `docs` documents, packed `pack` to a context."""

    def __init__(self, docs, pack, questions):
        self.docs, self.pack, self.questions = docs, pack, questions
        self.name = f"{docs}" if pack == 1 else f"{docs}x{pack}"
        self.contexts = docs // pack
        self.cases = None  # filled by load()
        self.tokens = []   # context tokens per question

    def load(self, svc, corpus, window, value_id, log):
        t0 = time.time()
        self.cases, self.tokens = [], []
        for ex in qa_examples(self.docs, self.questions, seed=VALIDATION, corpus=corpus):
            q, answer, value, _ = ex["qa"][0]
            ctxs = [" ".join(ex["docs"][i:i + self.pack]) for i in range(0, len(ex["docs"]), self.pack)]
            keys, _, ntok = svc.encode_entries(PREFIX, ctxs)
            lead = query_text(q) + " " + answer_lead(answer, value)
            seq, prompt = svc.score_full(svc.request(PREFIX, keys, lead, "SEQUENTIAL"))
            self.cases.append({"keys": keys, "query": query_text(q), "lead": lead, "expected": cut_answer(answer),
                               "value": value_id(lead, value), "seq": seq, "in_window": prompt <= window})
            self.tokens.append(sum(ntok))
        log(f"[{self.name}] {len(self.cases)} questions encoded, {self.contexts} contexts, median "
            f"{sorted(self.tokens)[len(self.tokens) // 2]} context tokens, "
            f"{sum(c['in_window'] for c in self.cases)} inside the window ({time.time() - t0:.0f} s)")

    def score_cell(self, svc, T, S):
        acc, nll, div, n_kl, hits, kls = 0, 0.0, 0.0, 0, [], []
        for c in self.cases:
            lp = svc.score(svc.request(PREFIX, c["keys"], c["lead"], "APE", T, S))
            ok = max(range(len(lp)), key=lp.__getitem__) == c["value"]
            acc += ok
            hits.append(int(ok))
            nll -= lp[c["value"]]
            if c["in_window"]:
                kls.append(round(kl(c["seq"], lp), 6))
                div += kls[-1]
                n_kl += 1
        n = len(self.cases)
        # kls: per question inside the window, in question order (the paired
        # comparison with T = S = 1 in kl_vs_parallel).
        return {"acc": acc / n, "nll": nll / n, "kl": div / n_kl if n_kl else None, "n_kl": n_kl, "n": n,
                "hits": "".join(map(str, hits)), "kls": kls}

    def generate_em(self, svc, T, S):
        em = sum(int(svc.answer(PREFIX, c["keys"], c["query"], "APE", T, S) == c["expected"]) for c in self.cases)
        return em / len(self.cases)

    def seq_acc(self):
        return sum(max(range(len(c["seq"])), key=c["seq"].__getitem__) == c["value"] for c in self.cases) / len(self.cases)


def uses_kl(cells):
    """KL to SEQUENTIAL is a group's objective when at least half of its
    questions have their SEQUENTIAL prompt inside the trained window (there
    SEQUENTIAL is what APE approximates, whatever its own accuracy)."""
    return cells[0]["kl"] is not None and cells[0]["n_kl"] >= cells[0]["n"] / 2


def kl_vs_parallel(cell, par):
    """Paired over the questions inside the window: (mean, standard error)
    of KL(SEQUENTIAL || cell) - KL(SEQUENTIAL || T = S = 1). T = S = 1 is
    PARALLEL, so a negative mean is a cell closer to SEQUENTIAL than
    PARALLEL; the mean plus one standard error below 0 is one that is so
    beyond the noise of the split."""
    d = [a - b for a, b in zip(cell["kls"], par["kls"])]
    if not d:
        return 0.0, 0.0
    m = sum(d) / len(d)
    var = sum((x - m) ** 2 for x in d) / (len(d) - 1) if len(d) > 1 else 0.0
    return m, math.sqrt(var / len(d))


def kl_z(cells, alpha=0.05, z=None):
    """The z of the paired upper confidence bound: one-sided at level
    alpha, Bonferroni-corrected for the cells compared with T = S = 1 (the
    pick is the best of them, and the best of many noisy differences is
    below 0 by chance: the winner's curse that made the 200-question rows
    of 2026-11-27 miss on the held-out split). `z` given: that instead."""
    if z is not None:
        return z
    from statistics import NormalDist
    m = max(sum((c["T"], c["S"]) != (1.0, 1.0) for c in cells), 1)
    return NormalDist().inv_cdf(1 - alpha / m)


def candidates(cells, par, z=1.0):
    """Cells best first, and the metric they are ordered by.
    KL groups (uses_kl): by the upper end of the paired KL difference to
    T = S = 1 (kl_vs_parallel: mean + z standard errors, kl_ucb; below 0 is a
    cell closer to SEQUENTIAL than PARALLEL beyond the noise), so a cell that
    is closer on most questions ranks before one whose lower mean comes from
    a few questions. Other groups: the cells whose acc is within one binomial
    standard error of the best acc, then the rest, each part by nll."""
    if uses_kl(cells):
        for c in cells:
            m, se = kl_vs_parallel(c, par)
            c["kl_gain"], c["kl_gain_se"], c["kl_ucb"], c["kl_z"] = m, se, m + z * se, z
        return sorted(cells, key=lambda c: (c["kl_ucb"], c["kl"], -c["acc"])), "kl_ucb"
    best = max(c["acc"] for c in cells)
    se = max(math.sqrt(best * (1 - best) / cells[0]["n"]), 1.0 / cells[0]["n"])
    return sorted(cells, key=lambda c: (c["acc"] < best - se - 1e-9, c["nll"], -c["acc"])), "nll"


def heatmap(path, group, cells, chosen):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    grid = [c for c in cells if not c.get("prediction")]
    Ts = sorted({c["T"] for c in grid})
    Ss = sorted({c["S"] for c in grid})
    metrics = [("acc", "value is top-1 (higher is better)", "viridis")]
    metrics.append(("kl", "KL to SEQUENTIAL (lower)", "magma_r") if grid[0]["kl"] is not None and
                   grid[0]["n_kl"] >= grid[0]["n"] / 2 else ("nll", "-log p(value) (lower)", "magma_r"))
    metrics.append(("em", "exact match, Generate (candidates only)", "viridis"))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for ax, (m, title, cmap) in zip(axes, metrics):
        z = [[float("nan")] * len(Ss) for _ in Ts]
        for c in grid:
            if c.get(m) is not None:
                z[Ts.index(c["T"])][Ss.index(c["S"])] = c[m]
        im = ax.imshow(z, origin="lower", cmap=cmap, aspect="auto")
        ax.set_xticks(range(len(Ss)), [f"{s:g}" for s in Ss], fontsize=7)
        ax.set_yticks(range(len(Ts)), [f"{t:g}" for t in Ts], fontsize=7)
        ax.set_xlabel("S")
        ax.set_ylabel("T")
        ax.set_title(title, fontsize=9)
        for i, t in enumerate(Ts):
            for j, s in enumerate(Ss):
                if not math.isnan(z[i][j]):
                    light = im.norm(z[i][j]) > 0.5 if m in ("acc", "em") else im.norm(z[i][j]) < 0.5
                    ax.text(j, i, f"{z[i][j]:.2f}", ha="center", va="center", fontsize=6,
                            color="black" if light else "white")
        ax.scatter([Ss.index(chosen["S"])], [Ts.index(chosen["T"])], marker="s", s=160, facecolors="none",
                   edgecolors="red", linewidths=2)
        fig.colorbar(im, ax=ax)
    em = f", exact match {chosen['em']:.2f}" if "em" in chosen else ""
    fig.suptitle(f"APE calibration, {group.name} documents ({group.contexts} contexts, {group.questions} validation "
                 f"questions); red: the pick T={chosen['T']:g} S={chosen['S']:g}{em}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "apeserve-qa.gguf"))
    ap.add_argument("--docs", type=int, nargs="+", default=[2, 3, 4, 8, 16, 32, 48, 64])
    ap.add_argument("--questions", type=int, default=200)
    ap.add_argument("--packed-docs", type=int, nargs="*", default=[32, 64],
                    help="document counts also run packed --pack to a context (the keying comparison)")
    ap.add_argument("--pack", type=int, default=4)
    ap.add_argument("--packed-grid", action="store_true",
                    help="search the whole grid on the packed groups too (default: only the two keyings' predictions, "
                    "the previous fixed preset and T = S = 1)")
    ap.add_argument("--t-grid", type=float, nargs="+", default=T_GRID)
    ap.add_argument("--s-grid", type=float, nargs="+", default=S_GRID)
    ap.add_argument("--no-refine", action="store_true", help="coarse grid only")
    ap.add_argument("--kl-em-tolerance", type=float, default=-1,
                    help="KL groups (inside the window): a row may answer this much less exact match than the "
                    "previous fixed preset on the validation split (negative: one binomial standard error)")
    ap.add_argument("--kl-t-grid", type=float, nargs="+", default=KL_T_GRID,
                    help="inside the trained window: the T of the search (instead of --t-grid)")
    ap.add_argument("--kl-s-grid", type=float, nargs="+", default=KL_S_GRID,
                    help="inside the trained window: the S of the search (instead of --s-grid)")
    ap.add_argument("--kl-alpha", type=float, default=0.05,
                    help="inside the window a row leaves T = S = 1 only for a cell whose paired KL difference to it has "
                    "its upper confidence bound below 0 at this one-sided level, Bonferroni-corrected over the cells")
    ap.add_argument("--kl-z", type=float, default=None, help="the bound's z instead (no correction)")
    ap.add_argument("--questions-for", nargs="*",
                    default=["2=1000", "3=2000", "4=2000", "8=3000", "16=400", "32=800", "64=400"], metavar="DOCS=N",
                    help="validation questions for these document counts instead of --questions (where the "
                    "cells closest to SEQUENTIAL differ from T = S = 1 by less than 200 questions resolve)")
    ap.add_argument("--em-generate-top", type=int, default=30,
                    help="outside the window: candidates (every cell within --generate-margin of the best acc) run "
                    "through Generate, at most this many")
    ap.add_argument("--kl-generate-top", type=int, default=40,
                    help="inside the window: the cells closer to SEQUENTIAL than T = S = 1 beyond the noise run "
                    "through Generate, closest first, until one does not lose exact match; at most this many")
    ap.add_argument("--generate-margin", type=float, default=0.1,
                    help="only cells whose acc is within this of the best are Generate candidates")
    ap.add_argument("--out", default="", help="preset path; default <model>.ape.json")
    ap.add_argument("--grid-out", default="", help="every cell's scores; default bench/results/calibration.json, "
                    "or <out>.grid.json when --out is given")
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "apeserve-quality", "calibration.jsonl"))
    ap.add_argument("--log", default="", help="also append progress lines to this file")
    ap.add_argument("--bin-dir", default=default_bin_dir(),
                    help="folder of ape-encoder and ape-decoder (default $APE_BIN_DIR, else <repo>/build/bin)")
    args = ap.parse_args()
    out = args.out or args.model + ".ape.json"
    grid_out = args.grid_out or (os.path.splitext(args.out)[0] + ".grid.json" if args.out
                                 else os.path.join(ROOT, "bench", "results", "calibration.json"))
    log = progress_logger(args.log)

    st = os.stat(args.model)
    model_id = f"{os.path.abspath(args.model)}:{st.st_size}:{int(st.st_mtime)}"
    records, cache_f = open_result_cache(args.cache)
    cache = {(r["model"], r["group"], r["questions"], r["T"], r["S"], r.get("what", "score")): r for r in records}

    def cached(group, T, S, what="score"):
        return cache.get((model_id, group.name, group.questions, round(T, 4), round(S, 4), what))

    def store(group, T, S, rec, what="score"):
        rec = dict(rec, model=model_id, group=group.name, questions=group.questions, T=round(T, 4), S=round(S, 4),
                   what=what)
        cache[(model_id, group.name, group.questions, rec["T"], rec["S"], what)] = rec
        cache_f.write(json.dumps(rec) + "\n")
        cache_f.flush()
        return rec

    corpus = corpus_of(args.model)
    q_for = {int(k): int(v) for k, v in (x.split("=") for x in args.questions_for)}
    groups = [Group(n, 1, q_for.get(n, args.questions)) for n in args.docs]
    packed = [Group(n, args.pack, max(args.questions * 3 // 4, 1)) for n in args.packed_docs]
    coarse = sorted({(round(t, 4), round(s, 4)) for t in args.t_grid for s in args.s_grid} | {(1.0, 1.0), FIXED})
    t_step = min(b - a for a, b in zip(sorted(args.t_grid), sorted(args.t_grid)[1:])) / 2
    s_step = min(b - a for a, b in zip(sorted(args.s_grid), sorted(args.s_grid)[1:])) / 2
    kl_coarse = sorted({(round(t, 4), round(s, 4)) for t in args.kl_t_grid for s in args.kl_s_grid}
                       | {(1.0, 1.0), FIXED})
    kl_t_step = min(b - a for a, b in zip(sorted(args.kl_t_grid), sorted(args.kl_t_grid)[1:])) / 2
    kl_s_step = min(b - a for a, b in zip(sorted(args.kl_s_grid), sorted(args.kl_s_grid)[1:])) / 2
    results = {}
    t_start = time.time()
    with Services(args.model, bin_dir=args.bin_dir) as svc:
        window = svc.window()
        value_ids = {}

        def value_id(lead, value):
            # The value's token after the lead, as the model's tokenizer cuts it.
            if (lead, value) not in value_ids:
                enc_pb = __import__("harness").stubs()[0]
                a = svc.enc.Tokenize(enc_pb.TokenizeRequest(text=(lead).encode())).ids
                b = svc.enc.Tokenize(enc_pb.TokenizeRequest(text=(lead + " " + value).encode())).ids
                assert list(b[:len(a)]) == list(a) and len(b) == len(a) + 1, (lead, value, a, b)
                value_ids[(lead, value)] = b[-1]
            return value_ids[(lead, value)]

        def run_cells(group, cells, label):
            done = []
            for i, (T, S) in enumerate(cells):
                rec = cached(group, T, S)
                src = "cached"
                if rec is None:
                    if group.cases is None:
                        group.load(svc, corpus, window, value_id, log)
                    t0 = time.time()
                    rec = store(group, T, S, group.score_cell(svc, T, S))
                    src = f"{time.time() - t0:.1f} s"
                done.append(rec)
                kl_s = f"{rec['kl']:.4f}" if rec["kl"] is not None else "-"
                log(f"[{group.name} docs] {label} cell {i + 1}/{len(cells)} T={T:g} S={S:g}: acc {rec['acc']:.3f} "
                    f"nll {rec['nll']:.3f} kl {kl_s} (n={rec['n']}, {src}; {time.time() - t_start:.0f} s in all)")
            return done

        def with_gen(group, T, S):
            rec = cached(group, T, S, "generate")
            if rec is None:
                if group.cases is None:
                    group.load(svc, corpus, window, value_id, log)
                rec = store(group, T, S, {"em": group.generate_em(svc, T, S)}, "generate")
            return rec["em"]

        def seq_stats(group):
            rec = cached(group, 0, 0, "sequential")
            if rec is None:
                if group.cases is None:
                    group.load(svc, corpus, window, value_id, log)
                toks = sorted(group.tokens)
                rec = store(group, 0, 0, {"acc": group.seq_acc(), "median_tokens": toks[len(toks) // 2],
                                          "min_tokens": toks[0], "max_tokens": toks[-1],
                                          "in_window": sum(c["in_window"] for c in group.cases)}, "sequential")
            return rec

        def calibrate_group(g, predict=None):
            seq = seq_stats(g)
            # Inside the trained window (at least half the questions'
            # SEQUENTIAL prompts fit) KL to SEQUENTIAL is the objective, and
            # the search is the KL grid.
            inside = seq["in_window"] >= g.questions / 2
            cells = run_cells(g, kl_coarse if inside else coarse, "coarse")
            par = next(c for c in cells if (c["T"], c["S"]) == (1.0, 1.0))

            def ranked():
                return candidates(cells, par, kl_z(cells, args.kl_alpha, args.kl_z))

            if not args.no_refine:
                top = max(c["acc"] for c in cells)
                c0 = [c for c in ranked()[0] if c["acc"] >= top - args.generate_margin][0]
                ts, ss = (kl_t_step, kl_s_step) if inside else (t_step, s_step)
                near = sorted({(round(min(max(c0["T"] + dt, MIN_P), MAX_P), 4), round(min(max(c0["S"] + ds, MIN_P), MAX_P), 4))
                               for dt in (-ts, 0, ts) for ds in (-ss, 0, ss)} - {(c["T"], c["S"]) for c in cells})
                cells += run_cells(g, near, "refine")
            # The teacher-forced acc does not see a wrong entity or cue word
            # before the value (S > 1 can break those): the leading
            # candidates are also run through Generate, and the pick is the
            # best whole-answer exact match among them.
            cands, by = ranked()
            top = max(c["acc"] for c in cells)
            # The references (the previous fixed preset, T = S = 1) run
            # through Generate and join the pool: a row never does worse on
            # the validation split than them.
            for c in cells:
                if (c["T"], c["S"]) in (FIXED, (1.0, 1.0)) and "em" not in c:
                    c["em"] = with_gen(g, c["T"], c["S"])
            ref = next(c for c in cells if (c["T"], c["S"]) == FIXED)
            tol = args.kl_em_tolerance
            if tol < 0:
                tol = math.sqrt(max(ref["em"] * (1 - ref["em"]), 1e-4) / g.questions)

            def em_ok(c):
                return c["em"] >= ref["em"] - tol - 1e-9

            def run_gen(c):
                c["em"] = with_gen(g, c["T"], c["S"])
                log(f"[{g.name} docs] candidate T={c['T']:g} S={c['S']:g}: generate EM {c['em']:.3f} (acc "
                    f"{c['acc']:.3f}, {by} {c[by]:.4f})")

            if by == "kl_ucb":
                # Inside the window the candidates are the cells closer to
                # SEQUENTIAL than T = S = 1 beyond the noise (kl_ucb < 0),
                # closest first, through Generate until one does not lose
                # exact match (em_ok: that one is the pick), at most
                # --kl-generate-top of them. With many contexts the closest
                # cells lose answers (16 documents: T 1.25-1.45 answer
                # 0.2-0.75), so the search goes down the list.
                sig, cands = [c for c in cands if c["kl_ucb"] < 0], []
                for c in sig[:args.kl_generate_top]:
                    if "em" not in c:
                        run_gen(c)
                    cands.append(c)
                    if em_ok(c):
                        break
            else:
                # Outside the window exact match is the objective and the
                # teacher-forced acc / nll order is a poor guide to it (a low T
                # has the worse nll and the better answers at 48+ documents):
                # every cell within the margin runs, up to --em-generate-top.
                cands = [c for c in cands if c["acc"] >= top - args.generate_margin][:args.em_generate_top]
                for c in cands:
                    if "em" not in c:
                        run_gen(c)
            pool = cands + [c for c in cells if (c["T"], c["S"]) in (FIXED, (1.0, 1.0)) and c not in cands]

            def pick():
                if by == "kl_ucb":
                    # Inside the window the row moves away from T = S = 1 (which
                    # IS PARALLEL) only on evidence: to the cell with the
                    # smallest kl_ucb (closer to SEQUENTIAL than T = S = 1 beyond
                    # the noise, Bonferroni-corrected over the cells searched)
                    # among those whose exact match is not below the previous
                    # fixed preset's by more than --kl-em-tolerance (default one
                    # binomial standard error of the fixed preset's). No such
                    # cell: T = S = 1, and APE is PARALLEL at that count.
                    ok = [c for c in pool if c["kl_ucb"] < 0 and em_ok(c)]
                    chosen = min(ok, key=lambda c: (c["kl_ucb"], -c["em"])) if ok else par
                else:
                    # Outside it: the best exact match, leaving the previous fixed
                    # preset only on evidence (beating it by more than one
                    # binomial standard error).
                    chosen = max(pool, key=lambda c: (c["em"], -c[by]))
                    if chosen["em"] - ref["em"] <= math.sqrt(max(ref["em"] * (1 - ref["em"]), 1e-4) / g.questions):
                        chosen = ref
                return chosen

            chosen = pick()
            if by == "kl_ucb" and not args.no_refine and chosen is not par:
                # The constrained pick is where T and S are worth resolving
                # (the first refinement followed the unconstrained leader):
                # its neighbourhood at half steps, scored and run through
                # Generate, then the pick again (over every cell searched: the
                # correction grows with them).
                near = sorted({(round(min(max(chosen["T"] + dt, MIN_P), MAX_P), 4),
                                round(min(max(chosen["S"] + ds, MIN_P), MAX_P), 4))
                               for dt in (-kl_t_step, 0, kl_t_step) for ds in (-kl_s_step, 0, kl_s_step)}
                              - {(c["T"], c["S"]) for c in cells})
                new = run_cells(g, near, "refine around the pick")
                cells += new
                ranked()  # kl_ucb of every cell, with the new cells counted
                for c in sorted(new, key=lambda c: c["kl_ucb"]):
                    if c["kl_ucb"] < min(chosen["kl_ucb"], 0):
                        run_gen(c)
                        pool.append(c)
                chosen = pick()
            gen = {f"{c['T']:g},{c['S']:g}": c["em"] for c in sorted(pool, key=lambda c: (c["T"], c["S"]))}
            oracle = sum(any(c["hits"][i] == "1" for c in cells) for i in range(cells[0]["n"])) / cells[0]["n"]
            results[g.name] = {"documents": g.docs, "pack": g.pack, "contexts": g.contexts, "questions": g.questions,
                               "sequential": seq, "cells": cells, "pick": chosen, "picked_by": by,
                               "generate_em": gen, "oracle_acc": oracle}
            if by == "kl_ucb":
                sig = sum(c["kl_ucb"] < 0 for c in cells)
                log(f"[{g.name} docs] KL to SEQUENTIAL: pick {chosen['kl']:.4f} (paired difference to T=S=1 "
                    f"{chosen['kl_gain']:+.4f} +- {chosen['kl_gain_se']:.4f}, z {chosen['kl_z']:.2f}), T=S=1 "
                    f"{par['kl']:.4f}, fixed {ref['kl']:.4f}; {sig} of {len(cells) - 1} cells closer than T=S=1 beyond "
                    f"the noise; exact match: pick {chosen['em']:.3f}, fixed {ref['em']:.3f}, T=S=1 {par['em']:.3f}")
            log(f"[{g.name} docs] pick T={chosen['T']:g} S={chosen['S']:g} (acc {chosen['acc']:.3f}, by {by}); "
                f"SEQUENTIAL acc {seq['acc']:.3f}; any cell right: {oracle:.3f}; generate EM {gen}")
            if predict:
                predict(g)
            g.cases = None  # the KV stays in Redis; free the distributions

        for g in groups:
            calibrate_group(g)

        # The two keyings, fitted on the unpacked groups. A row at 1 context
        # with T = S = 1: one context at T = S = 1 IS sequential encoding
        # (docs/APE.md, section 4), nothing can do better there.
        by_ctx = [(1, 1.0, 1.0)] + [(g.contexts, results[g.name]["pick"]["T"], results[g.name]["pick"]["S"])
                                    for g in groups]
        by_tok = token_rows([(results[g.name]["sequential"], results[g.name]["pick"]["T"],
                              results[g.name]["pick"]["S"]) for g in groups])
        # The tokens table's first row: T = S = 1 up to the largest single
        # document of the validation split (documents are 12-20 tokens, two
        # of them at least 24), so that a request with one document is
        # sequential encoding exactly, as the contexts key gives it; a longer
        # single context is interpolated like any request.
        one_doc = max(svc.encode_entries(PREFIX, ex["docs"])[2][0]
                      for ex in qa_examples(1, args.questions, seed=VALIDATION, corpus=corpus))
        if one_doc < by_tok[0][0]:
            by_tok = [(one_doc, 1.0, 1.0)] + by_tok
        log(f"largest single validation document: {one_doc} tokens; tokens table {by_tok}")
        keying = {"contexts": {"score": [0, 0.0]}, "context_tokens": {"score": [0, 0.0]}}

        def predict(g):
            preds = {"contexts": interpolate(by_ctx, g.contexts),
                     "context_tokens": interpolate(by_tok, results[g.name]["sequential"]["median_tokens"])}
            for key, (T, S) in preds.items():
                rec = run_cells(g, [(round(T, 4), round(S, 4))], f"{key}-keyed prediction")[0]
                rec = dict(rec, prediction=key, em=with_gen(g, round(T, 4), round(S, 4)))
                results[g.name]["cells"].append(rec)
                results[g.name].setdefault("predictions", {})[key] = {"T": rec["T"], "S": rec["S"], "acc": rec["acc"],
                                                                      "nll": rec["nll"], "em": rec["em"]}
                keying[key]["score"][0] += rec["em"] * g.questions
                keying[key]["score"][1] += rec["nll"] * g.questions
                log(f"[{g.name} docs] keyed by {key}: T={T:.3f} S={S:.3f} generate EM {rec['em']:.3f} acc "
                    f"{rec['acc']:.3f} nll {rec['nll']:.3f}")

        for g in packed:
            if args.packed_grid:
                calibrate_group(g, predict)
                continue
            # Only what the comparison needs: the two predictions (predict),
            # the previous fixed preset and T = S = 1.
            cells = run_cells(g, [FIXED, (1.0, 1.0)], "reference")
            seq = seq_stats(g)
            gen = {f"{T:g},{S:g}": with_gen(g, T, S) for T, S in (FIXED, (1.0, 1.0))}
            results[g.name] = {"documents": g.docs, "pack": g.pack, "contexts": g.contexts, "questions": g.questions,
                               "sequential": seq, "cells": cells, "pick": None, "generate_em": gen}
            predict(g)
            g.cases = None
        n_packed = sum(g.questions for g in packed) or 1
        for key in keying:
            keying[key] = {"em": keying[key]["score"][0] / n_packed, "nll": keying[key]["score"][1] / n_packed}
        # Contexts unless tokens predict clearly better (by more than one
        # binomial standard error of the exact match): only the contexts key
        # can give one context T = S = 1, which is sequential encoding.
        key = "contexts"
        em_c, em_t = keying["contexts"]["em"], keying["context_tokens"]["em"]
        if packed and em_t - em_c > math.sqrt(max(em_c * (1 - em_c), 1e-4) / n_packed):
            key = "context_tokens"
        rows = by_ctx if key == "contexts" else by_tok
        # The fixed fallback (0 contexts, and any reader of version 1): of
        # the cells run through Generate at every document count (at least
        # the version-1 preset and T = S = 1), the best mean exact match.
        pooled = {}
        for g in groups:
            for ts, em in results[g.name]["generate_em"].items():
                pooled.setdefault(tuple(float(v) for v in ts.split(",")), []).append(em)
        fallback = max((k for k in pooled if len(pooled[k]) == len(groups)), key=lambda k: (sum(pooled[k]), k == FIXED))

    span = (f"inside the trained window (KL to SEQUENTIAL) T {'/'.join(f'{v:g}' for v in args.kl_t_grid)} x S "
            f"{'/'.join(f'{v:g}' for v in args.kl_s_grid)}, a row other than T = S = 1 only where a cell is closer "
            f"than T = S = 1 beyond the noise (paired upper bound below 0, "
            + (f"z {args.kl_z:g}" if args.kl_z is not None else f"alpha {args.kl_alpha:g} Bonferroni-corrected")
            + f"); outside it (exact match) T {'/'.join(f'{v:g}' for v in args.t_grid)} x S "
            f"{'/'.join(f'{v:g}' for v in args.s_grid)}"
            + ("" if args.no_refine else "; refined at half steps around the best")
            + "; each row held over its document count's span of tokens")
    preset = {
        "version": 2,
        "temperature": fallback[0], "scale": fallback[1],
        "by": key,
        "interpolation": "linear in log2(key) between rows, clamped to the first and last row",
        "table": [{key: k, "temperature": round(t, 4), "scale": round(s, 4)} for k, t, s in rows],
        "source": f"bench/quality/calibrate.py: {span}; {args.questions} validation questions per document count "
                  f"({'/'.join(map(str, args.docs))}{''.join(f'; {v} at {k}' for k, v in q_for.items() if k in args.docs)}); keyed by {key} (packed check, exact match: by contexts "
                  f"{keying['contexts'].get('em', 0):.3f}, by tokens {keying['context_tokens'].get('em', 0):.3f}); "
                  f"fixed fallback = best mean exact match over the document counts",
    }
    for path in (out, grid_out):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(out, "w") as f:
        # One table row per line: the file is read by people too.
        text = json.dumps(preset, indent=2)
        for row in preset["table"]:
            text = text.replace(json.dumps(row, indent=2).replace("\n", "\n    "), json.dumps(row), 1)
        f.write(text + "\n")
    with open(grid_out, "w") as f:
        # Without the per-question KL lists (kls; their paired summary is in
        # kl_gain / kl_gain_se): they would make the file megabytes.
        slim = {name: dict(r, cells=[{k: v for k, v in c.items() if k != "kls"} for c in r["cells"]],
                           pick=r["pick"] and {k: v for k, v in r["pick"].items() if k != "kls"})
                for name, r in results.items()}
        json.dump({"preset": preset, "window": window, "keying": keying,
                   "tables": {"contexts": by_ctx, "context_tokens": by_tok}, "groups": slim}, f, indent=1)
    plots = 0
    for g in groups + (packed if args.packed_grid else []):
        plots += heatmap(os.path.join(os.path.dirname(os.path.abspath(grid_out)), f"calibration_{g.name}.png"), g,
                         results[g.name]["cells"], results[g.name]["pick"])
    log(f"preset ({key}) {preset['table']} fallback T={fallback[0]} S={fallback[1]} -> {out}; grid -> {grid_out}; "
        f"{plots} heat maps; {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
