#!/usr/bin/python3
"""Quality of APE against sequential encoding, through the real services.

For 1, 2, 3, 4, 8, 16, 32, 48, 64 and 128 documents per question, on the
held-out split (harness.HELDOUT; never the VALIDATION split calibrate.py
fits the preset on): exact match of SEQUENTIAL, PARALLEL without a shared prefix,
PARALLEL with the shared prefix, APE with the fixed preset (--fixed-t,
--fixed-s: the version-1 preset, sent as the request's T and S) and APE with
the model's adaptive preset (<model>.ape.json version 2: the request names no
T or S, the decoder picks them per request and reports them in Final; each
is checked against the table's interpolation here). Each parallel mode's
next-token distribution at the answer's value is compared with SEQUENTIAL's
(mean KL divergence, top-1 agreement) over the questions whose SEQUENTIAL
prompt fits the model's trained window. SEQUENTIAL and PARALLEL without a
prefix run up to --seq-max-docs documents (beyond it SEQUENTIAL is far out
of its window and answers nothing, and it is the most expensive mode),
PARALLEL without a prefix (which needs its own encoding) up to
--noprefix-max-docs. --skip-stories keeps the previous run's stories260K rows.

A breakdown of the questions APE gets wrong at 2-8 documents (the gap to
SEQUENTIAL) goes into the report: how often the wrong answer is another
document's value for the asked relation, and whether that document states
the relation at the same token offset (every corpus word is one token and
every context starts at the same position, so the two values then share
their RoPE position).

The same fidelity numbers on stories260K with story passages as contexts.
Writes bench/results/quality.{md,json} and quality_*.png. Every question's
outcome is appended to --cache (default $TMPDIR/apeserve-quality/
evaluate.jsonl): a rerun skips finished questions (and their encoding), and
after a change of preset reruns only APE adaptive (the other variants'
outcomes do not depend on it).

  /usr/bin/python3 bench/quality/evaluate.py [--split 3] [--questions 200]
      [--more-questions 400 --more-questions-from 32] [--questions-for 2=2000 ... 128=100]
      [--fixed-t 0.8 --fixed-s 0.9] [--preset PRESET.json] [--bin-dir build/bin]
      [--out bench/results/quality] [--log FILE] [--prefetch]

stories260K and its tokenizer come from tests/data ($APE_TEST_DATA).
"""
import argparse
import json
import math
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (HELDOUT, ROOT, VALIDATION, Services, answer_lead, argmax, corpus_of, cut_answer,  # noqa: E402
                     kl, open_result_cache, progress_logger, qa_examples)
from apeserve_launcher import default_bin_dir, test_data_dir  # noqa: E402
from corpus import PREFIX, World, query_text  # noqa: E402
from calibrate import interpolate  # noqa: E402

RESULTS = os.path.join(ROOT, "bench", "results")
DOC_COUNTS = [1, 2, 3, 4, 8, 16, 32, 48, 64, 128]
STORY_DOC_COUNTS = [1, 2, 4, 8, 16, 32]
GAP_DOC_COUNTS = [2, 3, 4, 8]
# The same breakdown where exact match is the target (what the errors are
# that keep APE under 0.90 there).
TARGET_DOC_COUNTS = [32, 64]
# (name, mode, shared prefix?, T/S: "fixed", "preset" or None (mode's own))
VARIANTS = [
    ("SEQUENTIAL", "SEQUENTIAL", True, None),
    ("PARALLEL (no prefix)", "PARALLEL", False, None),
    ("PARALLEL", "PARALLEL", True, None),
    ("APE fixed", "APE", True, "fixed"),
    ("APE adaptive", "APE", True, "preset"),
]
STORY_VARIANTS = [("SEQUENTIAL", "SEQUENTIAL", True), ("PARALLEL (no prefix)", "PARALLEL", False),
                  ("PARALLEL", "PARALLEL", True), ("APE", "APE", True)]
SEQ_ONLY = ("SEQUENTIAL", "PARALLEL (no prefix)")  # limited to --seq-max-docs


def fact_slots(doc, world):
    """{relation: (word index of the value, value)} of one document: every
    corpus word is one token, so a word index is a token offset."""
    words = doc.split()
    out = {}
    for r, (template, _, _) in world.relations.items():
        t = template.split()
        cue = t[t.index("{v}") - 1]
        if cue in words[:-1]:
            i = words.index(cue) + 1
            out[r] = (i, words[i])
    return out


def question_features(ex, world):
    """Where the asked value sits, and which other documents state the asked
    relation (hard negatives) and at which offset."""
    q, answer, value, i = ex["qa"][0]
    slots = [fact_slots(d, world) for d in ex["docs"]]
    rel = next(r for r, (p, v) in slots[i].items() if v == value)
    pos = slots[i][rel][0]
    others = [(j, s[rel]) for j, s in enumerate(slots) if j != i and rel in s]
    return {"relation": rel, "value_offset": pos, "answer_doc": i,
            "hard_negatives": len(others), "same_offset": sum(p == pos for _, (p, _) in others),
            "distractor_values": sorted({v for _, (_, v) in others}),
            "entity": answer.split()[0]}


def evaluate_qa(svc, model_name, args, preset, log, corpus, cache, store):
    world = World(seed=corpus[1], style=corpus[0])
    window = svc.window()
    rows = None
    if preset.get("version") == 2:
        rows = [(r[preset["by"]], r["temperature"], r["scale"]) for r in preset["table"]]
    per_question = []
    t_start = time.time()
    for n_docs in DOC_COUNTS:
        t0 = time.time()
        n_q = args.more_questions if n_docs >= args.more_questions_from else args.questions
        n_q = args.q_for.get(n_docs, n_q)
        exs = qa_examples(n_docs, n_q, seed=args.split, corpus=corpus)
        for qi, ex in enumerate(exs):
            # Question qi is the same whatever the count asked for (one seeded
            # stream per document count), so the count is not in the key.
            key = (f"{model_name}|split{args.split}|{n_docs}|{qi}|{args.fixed_t}|{args.fixed_s}|{args.seq_max_docs}|"
                   f"{args.noprefix_max_docs}")
            base, ada = cache["base"].get(key), cache["adaptive"].get(key)
            if args.prefetch and base is not None:
                continue
            if base is not None and ada is not None:
                per_question.append(dict(base, answers=dict(base["answers"], **ada["answers"]),
                                         kl=dict(base["kl"], **ada["kl"]), top1=dict(base["top1"], **ada["top1"]),
                                         **{k: v for k, v in ada.items() if k not in ("answers", "kl", "top1")}))
                continue
            q, answer, value, _ = ex["qa"][0]
            query = query_text(q)
            # Distributions are compared where it matters: at the answer's
            # value, after its restating words ("... answer : Neub lives in").
            lead = answer_lead(answer, value)
            expected = cut_answer(answer)
            keys, _, ntok = svc.encode_entries(PREFIX, ex["docs"])
            keys = {True: keys}
            rec = {"documents": n_docs, "q": qi, "expected": expected, "context_tokens": sum(ntok),
                   "answers": {}, "kl": {}, "top1": {}}
            rec.update(question_features(ex, world))
            # Only the adaptive variant depends on the preset: with the other
            # variants' outcomes cached (base), it alone runs again, plus
            # SEQUENTIAL's Score when its distribution is the KL reference.
            ada = {"answers": {}, "kl": {}, "top1": {}}
            seq_scores = None
            for name, mode, with_prefix, ts in VARIANTS:
                if name in SEQ_ONLY and n_docs > args.seq_max_docs:
                    continue
                if not with_prefix and n_docs > args.noprefix_max_docs:
                    continue
                if base is not None and ts != "preset" and not (name == "SEQUENTIAL" and base.get("in_window")):
                    continue
                if args.prefetch and ts == "preset":
                    continue
                if with_prefix not in keys:
                    keys[with_prefix] = svc.encode("" if not with_prefix else PREFIX, ex["docs"])
                prefix = PREFIX if with_prefix else ""
                # Without the shared prefix the instruction moves into the query.
                qtext = query if with_prefix else PREFIX + " " + query
                T, S = (args.fixed_t, args.fixed_s) if ts == "fixed" else (None, None)
                out = ada if ts == "preset" else rec
                if not (base is not None and name == "SEQUENTIAL"):
                    got, final = svc.answer_final(prefix, keys[with_prefix], qtext, mode, T, S)
                    out["answers"][name] = got
                if ts == "preset":
                    ada["T_used"], ada["S_used"] = round(final.ape_temperature, 5), round(final.ape_scale, 5)
                    if rows:
                        want = interpolate(rows, n_docs if preset["by"] == "contexts" else sum(ntok))
                        ada["table_match"] = abs(want[0] - final.ape_temperature) < 1e-4 and \
                            abs(want[1] - final.ape_scale) < 1e-4
                scores, prompt = svc.score_full(svc.request(prefix, keys[with_prefix], qtext + " " + lead, mode, T, S))
                if name == "SEQUENTIAL":
                    seq_scores = scores
                    rec["in_window"] = prompt <= window
                    rec["seq_prompt_tokens"] = prompt
                elif seq_scores is not None and rec["in_window"]:
                    out["kl"][name] = kl(seq_scores, scores)
                    out["top1"][name] = int(argmax(scores) == argmax(seq_scores))
            if base is None:
                base = rec
                store("base", key, base)
            if args.prefetch:
                continue
            store("adaptive", key, ada)
            per_question.append(dict(base, answers=dict(base["answers"], **ada["answers"]),
                                     kl=dict(base["kl"], **ada["kl"]), top1=dict(base["top1"], **ada["top1"]),
                                     **{k: v for k, v in ada.items() if k not in ("answers", "kl", "top1")}))
        if args.prefetch:
            log(f"{model_name} N={n_docs:3d}: the preset-independent variants of {n_q} questions cached "
                f"({time.time() - t0:.0f} s, {time.time() - t_start:.0f} s in all)")
            continue
        qs = [r for r in per_question if r["documents"] == n_docs]
        line = " ".join(f"{name}={sum(r['answers'][name] == r['expected'] for r in qs) / len(qs):.2f}"
                        for name, *_ in VARIANTS if name in qs[0]["answers"])
        log(f"{model_name} N={n_docs:3d}: {line} ({time.time() - t0:.0f} s, {time.time() - t_start:.0f} s in all)")
    return per_question, window


def summarize(per_question, model_name, args, preset):
    records = []
    for n_docs in DOC_COUNTS:
        qs = [r for r in per_question if r["documents"] == n_docs]
        inw = [r for r in qs if r.get("in_window")]
        for name, mode, _, ts in VARIANTS:
            if name not in qs[0]["answers"]:
                continue
            rec = {"model": model_name, "mode": name, "documents": n_docs, "n_questions": len(qs),
                   "exact_match": sum(r["answers"][name] == r["expected"] for r in qs) / len(qs),
                   "n_kl": len(inw) if name != "SEQUENTIAL" else len(inw),
                   "kl_to_sequential": (sum(r["kl"][name] for r in inw) / len(inw) if inw else None)
                   if name != "SEQUENTIAL" else 0.0,
                   "top1_agreement": (sum(r["top1"][name] for r in inw) / len(inw) if inw else None)
                   if name != "SEQUENTIAL" else 1.0}
            if ts == "fixed":
                rec["T"], rec["S"] = args.fixed_t, args.fixed_s
            elif ts == "preset":
                # Paired with APE fixed: the questions only one of them answers.
                ok = lambda r, m: r["answers"].get(m) == r["expected"]  # noqa: E731
                rec["vs_fixed"] = {"only_adaptive": sum(ok(r, name) and not ok(r, "APE fixed") for r in qs),
                                   "only_fixed": sum(ok(r, "APE fixed") and not ok(r, name) for r in qs)}
                used = sorted({(r["T_used"], r["S_used"]) for r in qs})
                rec["T"] = sum(r["T_used"] for r in qs) / len(qs)
                rec["S"] = sum(r["S_used"] for r in qs) / len(qs)
                rec["T_S_used"] = used if len(used) <= 4 else used[:2] + ["..."] + used[-2:]
                rec["table_match"] = sum(r.get("table_match", False) for r in qs)
            else:
                rec["T"] = rec["S"] = 1.0
            if ts and inw and all("PARALLEL" in r["kl"] for r in inw):
                # Paired with PARALLEL over the same questions: the mean
                # difference and its standard error, the share of questions
                # where this mode is closer to SEQUENTIAL, and how much of the
                # summed difference the 5 questions farthest from it carry.
                d = sorted(r["kl"][name] - r["kl"]["PARALLEL"] for r in inw)
                m = sum(d) / len(d)
                se = math.sqrt(sum((x - m) ** 2 for x in d) / (len(d) - 1) / len(d)) if len(d) > 1 else 0.0
                rec["kl_vs_parallel"] = {"mean": m, "se": se, "closer": sum(x < -1e-6 for x in d) / len(d),
                                         "farther": sum(x > 1e-6 for x in d) / len(d), "worst5": sum(d[-5:])}
            records.append(rec)
    return records


def gap_analysis(per_question):
    """For each document count in GAP_DOC_COUNTS and each mode: errors, how
    many answered a hard negative's value, and the error rate with and
    without a hard negative at the same offset as the answer."""
    out = []
    for n in GAP_DOC_COUNTS + TARGET_DOC_COUNTS:
        qs = [r for r in per_question if r["documents"] == n]
        if not qs:
            continue
        for name in ("SEQUENTIAL", "PARALLEL", "APE fixed", "APE adaptive"):
            if name not in qs[0]["answers"]:
                continue
            wrong = [r for r in qs if r["answers"][name] != r["expected"]]
            distractor = [r for r in wrong if r["answers"][name].split()[-1:] and
                          r["answers"][name].split()[-1] in r["distractor_values"]]
            wrong_entity = [r for r in wrong if r["answers"][name].split()[:1] != [r["entity"]]]
            same = [r for r in qs if r["same_offset"] > 0]
            other = [r for r in qs if r["same_offset"] == 0 and r["hard_negatives"] > 0]
            none = [r for r in qs if r["hard_negatives"] == 0]
            err = lambda rs: (sum(r["answers"][name] != r["expected"] for r in rs), len(rs))  # noqa: E731
            out.append({"documents": n, "mode": name, "questions": len(qs), "wrong": len(wrong),
                        "answered_a_hard_negative": len(distractor), "wrong_entity": len(wrong_entity),
                        "errors_same_offset": err(same), "errors_other_offset": err(other),
                        "errors_no_hard_negative": err(none),
                        "examples": [{"expected": r["expected"], "answer": r["answers"][name],
                                      "same_offset": r["same_offset"]} for r in wrong[:3]]})
    return out


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
    for n_docs in STORY_DOC_COUNTS:
        stats = {v[0]: {"kl": 0.0, "top1": 0} for v in STORY_VARIANTS}
        for i in range(n_questions):
            docs = rng.sample(passages, n_docs)
            query = queries[i % len(queries)]
            keys = {True: svc.encode(prefix, docs), False: svc.encode("", docs)}
            seq_scores = None
            for name, mode, with_prefix in STORY_VARIANTS:
                p = prefix if with_prefix else ""
                req = svc.request(p, keys[with_prefix], query if with_prefix else " " + prefix + query, mode, T, S)
                scores = svc.score(req)
                if name == "SEQUENTIAL":
                    seq_scores = scores
                else:
                    stats[name]["kl"] += kl(seq_scores, scores)
                    stats[name]["top1"] += int(argmax(scores) == argmax(seq_scores))
        for name, mode, _ in STORY_VARIANTS:
            rec = {"model": "stories260K", "mode": name, "documents": n_docs, "exact_match": None,
                   "kl_to_sequential": 0.0 if name == "SEQUENTIAL" else stats[name]["kl"] / n_questions,
                   "top1_agreement": 1.0 if name == "SEQUENTIAL" else stats[name]["top1"] / n_questions,
                   "n_questions": n_questions, "T": T if mode == "APE" else 1.0, "S": S if mode == "APE" else 1.0}
            records.append(rec)
            log(f"stories260K N={n_docs:2d} {name:22s} KL={rec['kl_to_sequential']:.4f} top1={rec['top1_agreement']:.3f}")
    return records


def fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def write_outputs(records, gap, calibration, preset, args, window, out_prefix, load):
    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
    with open(out_prefix + ".json", "w") as f:
        json.dump({"records": records, "gap": gap, "preset": preset, "window": window, "load_average": load}, f,
                  indent=1)
    lines = ["# Quality: APE against sequential encoding", "",
             "Generated by `bench/quality/evaluate.py` through the real ape-encoder and ape-decoder "
             f"(load average at the end of the run: {load}).", ""]
    qa = [r for r in records if r["exact_match"] is not None]
    if qa:
        model = qa[0]["model"]
        names = [v[0] for v in VARIANTS]
        ada = [r for r in qa if r["mode"] == "APE adaptive"]
        lines += [f"## {model}", "",
                  f"Held-out questions per row: {args.questions}, {args.more_questions} from {args.more_questions_from} "
                  f"documents on{''.join(f', {v} at {k}' for k, v in sorted(args.q_for.items()))} (split {args.split} of `harness.qa_examples`: "
                  f"{'HELDOUT, disjoint from the validation split the preset was fitted on; its first 200 questions per document count (400 from 32 on, 800 at 8) also measured the previous table' if args.split == HELDOUT else 'not the current held-out split'}"
                  f"). APE fixed: T={args.fixed_t:g} S={args.fixed_s:g} "
                  "(the version-1 preset), sent with each request. APE adaptive: the request names no T or S; the "
                  f"decoder takes them from `{os.path.relpath(args.preset_path, ROOT)}` (version 2, by "
                  f"{preset.get('by', '-')}, {preset.get('interpolation', '')}); the T and S it reported in `Final` "
                  f"equal the table's interpolation for {sum(r.get('table_match', 0) for r in ada)} of "
                  f"{sum(r['n_questions'] for r in ada)} requests. SEQUENTIAL runs up to "
                  f"{args.seq_max_docs} documents, PARALLEL (no prefix) up to {args.noprefix_max_docs}.", "",
                  "Exact match (greedy answer, cut at \" .\"):", "",
                  "| documents | " + " | ".join(names) + " | adaptive T, S | APE adaptive / SEQUENTIAL |",
                  "|---:|" + "---:|" * (len(names) + 2)]
        for n in DOC_COUNTS:
            row = {r["mode"]: r for r in qa if r["documents"] == n}
            if not row:
                continue
            seq = row.get("SEQUENTIAL", {}).get("exact_match")
            ratio = f"{row['APE adaptive']['exact_match'] / seq:.2f}" if seq else "-"
            lines.append(f"| {n} | " + " | ".join(fmt(row[v]["exact_match"]) if v in row else "-" for v in names) +
                         f" | {row['APE adaptive']['T']:.2f}, {row['APE adaptive']['S']:.2f} | {ratio} |")
        lines += ["", f"Next-token distribution at the answer's value (after its restating words) against SEQUENTIAL's, "
                  f"over the questions whose SEQUENTIAL prompt fits the trained window ({window} tokens): mean KL "
                  "divergence / top-1 agreement (n = questions inside the window):", "",
                  "| documents | n | " + " | ".join(names[1:]) + " |", "|---:|---:|" + "---:|" * (len(names) - 1)]
        for n in DOC_COUNTS:
            row = {r["mode"]: r for r in qa if r["documents"] == n}
            if not row or "SEQUENTIAL" not in row or not row["SEQUENTIAL"]["n_kl"]:
                continue
            lines.append(f"| {n} | {row['SEQUENTIAL']['n_kl']} | " + " | ".join(
                f"{fmt(row[v]['kl_to_sequential'], '.4f')} / {fmt(row[v]['top1_agreement'], '.2f')}" if v in row else "-"
                for v in names[1:])
                + " |")
        lines.append("")
    if gap:
        lines += ["### Where APE loses to SEQUENTIAL at 2-8 documents", "",
                  "Per mode: wrong answers; of those, answers that gave another document's value for the asked relation "
                  "(a hard negative) and answers that named another entity; then errors / questions among questions "
                  "whose hard negative states the relation at the same token offset as the answer (the two values "
                  "share their RoPE position in the parallel modes), at another offset, and with no hard negative.", "",
                  "| documents | mode | wrong | hard negative's value | other entity | same offset | other offset | "
                  "no hard negative |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
        for g in gap:
            if g["documents"] in TARGET_DOC_COUNTS and g["documents"] not in GAP_DOC_COUNTS:
                continue
            lines.append(f"| {g['documents']} | {g['mode']} | {g['wrong']} / {g['questions']} | "
                         f"{g['answered_a_hard_negative']} | {g['wrong_entity']} | "
                         + " | ".join(f"{a} / {b}" for a, b in (g["errors_same_offset"], g["errors_other_offset"],
                                                                g["errors_no_hard_negative"])) + " |")
        lines.append("")
        for name in ("APE fixed", "APE adaptive"):
            gs = [g for g in gap if g["mode"] == name and g["documents"] in GAP_DOC_COUNTS]
            wrong = sum(g["wrong"] for g in gs)
            if wrong:
                same = sum(g["errors_same_offset"][0] for g in gs)
                n_same = sum(g["errors_same_offset"][1] for g in gs)
                n_all = sum(g["questions"] for g in gs)
                lines.append(f"{name} at {'/'.join(str(g['documents']) for g in gs)} documents: {wrong} wrong answers, "
                             f"{sum(g['answered_a_hard_negative'] for g in gs)} of them a hard negative's value, "
                             f"{sum(g['wrong_entity'] for g in gs)} with another entity; {same} of the {wrong} errors "
                             f"had a hard negative at the answer's offset, where {n_same} of the {n_all} questions "
                             "had one.")
        if calibration:
            gs = {name: g for name, g in calibration["groups"].items() if g["pack"] == 1 and g["documents"] <= 8}
            if gs:
                lines += ["", "Does any T, S close the gap? No. On the validation split, counting a question as right "
                          "when any one of the searched cells (" + "/".join(str(len(g["cells"])) for g in gs.values())
                          + " of them) has the value as its top-1 token: " + "; ".join(
                              f"{g['documents']} documents {g['oracle_acc']:.3f} (best single cell "
                              f"{max(c['acc'] for c in g['cells']):.3f}, SEQUENTIAL {g['sequential']['acc']:.3f})"
                              for g in gs.values()) + ". Almost every wrong answer is another document's value for "
                          "the asked relation: binding a value to its entity across documents encoded apart (sharing "
                          "their positions) fails. T and S cannot repair that: within a head T rescales every context "
                          "logit by the same factor and S weighs the context block as a whole, so neither changes "
                          "which of two context tokens a head ranks higher; they only trade the contexts' weight "
                          "against the prefix's and the query's (docs/APE.md, section 5)."]
        lines.append("")
    tg = [g for g in gap if g["documents"] in TARGET_DOC_COUNTS and g["documents"] not in GAP_DOC_COUNTS]
    if tg:
        lines += ["### The errors at 32 and 64 documents", "",
                  "The same breakdown where exact match is the target (SEQUENTIAL is out of its window there):", "",
                  "| documents | mode | wrong | hard negative's value | other entity | same offset | other offset | "
                  "no hard negative |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
        for g in tg:
            lines.append(f"| {g['documents']} | {g['mode']} | {g['wrong']} / {g['questions']} | "
                         f"{g['answered_a_hard_negative']} | {g['wrong_entity']} | "
                         + " | ".join(f"{a} / {b}" for a, b in (g["errors_same_offset"], g["errors_other_offset"],
                                                                g["errors_no_hard_negative"])) + " |")
        lines.append("")
    if calibration:
        lines += ["Calibration (validation split, `bench/results/calibration.json`; the preset's rows): the value as "
                  "top-1 token, SEQUENTIAL against the best APE cell of the T x S search and against \"some cell gets "
                  "it right\" (the union over all cells, an upper bound for any T, S); the row picked, by what (KL: "
                  "T = S = 1 unless a cell is closer to SEQUENTIAL than T = S = 1 beyond the noise (the paired difference's "
                  "upper bound, mean + z standard errors with z Bonferroni-corrected over the cells searched, below "
                  "0), then the closest such cell that does not lose exact match to the fixed preset; "
                  "EM: best exact match), its Generate exact match against the fixed preset's and T = S = 1's, and "
                  "inside the window its KL to SEQUENTIAL against T = S = 1's (paired difference +- one standard "
                  "error), the z of the bound and how many cells had their bound below 0:", "",
                  "| documents | questions | SEQUENTIAL | best APE cell | any cell | row T, S | by | EM row / fixed / "
                  "T=S=1 | KL row / T=S=1 (difference) | z; cells below 0 |",
                  "|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
        for name, g in calibration["groups"].items():
            if g["pack"] != 1:
                continue
            best = max(c["acc"] for c in g["cells"])
            p = g["pick"]
            ref = lambda t, s_: next((c for c in g["cells"] if (c["T"], c["S"]) == (t, s_) and "em" in c), None)  # noqa: E731
            fx, par = ref(args.fixed_t, args.fixed_s), ref(1.0, 1.0)
            em = f"{p['em']:.3f} / {fx['em']:.3f} / {par['em']:.3f}" if fx and par and "em" in p else "-"
            klc = (f"{p['kl']:.3f} / {par['kl']:.3f} ({p['kl_gain']:+.3f} +- {p['kl_gain_se']:.3f})"
                   if g.get("picked_by") == "kl_ucb" and par else "-")
            by = {"kl_ucb": "KL", "nll": "EM"}.get(g.get("picked_by"), "-")
            sig = (f"{p['kl_z']:.2f}; {sum(c.get('kl_ucb', 0) < 0 for c in g['cells'] if not c.get('prediction'))} of "
                   f"{sum(not c.get('prediction') for c in g['cells']) - 1}" if g.get("picked_by") == "kl_ucb"
                   and "kl_z" in p else "-")
            lines.append(f"| {name} | {g['questions']} | {g['sequential']['acc']:.3f} | {best:.3f} | "
                         f"{g['oracle_acc']:.3f} | {p['T']:g}, {p['S']:g} | {by} | {em} | {klc} | {sig} |")
        lines.append("")
    if qa:
        row = lambda n, m: next((r for r in qa if r["documents"] == n and r["mode"] == m), None)  # noqa: E731
        lines += ["### Targets", ""]
        for n in (32, 64):
            r = row(n, "APE adaptive")
            if r:
                cal = ""
                g = (calibration or {}).get("groups", {}).get(str(n))
                if g and g.get("generate_em"):
                    ts, em = max(g["generate_em"].items(), key=lambda kv: kv[1])
                    cal = (f"; on the validation split the best exact match of the {len(g['generate_em'])} cells run "
                           f"through Generate was {em:.3f} (T, S = {ts.replace(',', ', ')}) of {g['questions']}, "
                           f"the row's {g['pick']['em']:.3f}")
                lines.append(f"- APE adaptive at {n} documents: exact match {r['exact_match']:.3f} of {r['n_questions']} "
                             f"({'meets' if r['exact_match'] >= 0.9 else 'below'} 0.90; APE fixed "
                             f"{row(n, 'APE fixed')['exact_match']:.3f}, PARALLEL {row(n, 'PARALLEL')['exact_match']:.3f}"
                             f"{cal}).")
        if row(8, "APE adaptive"):
            a, f = row(8, "APE adaptive")["exact_match"], row(8, "APE fixed")["exact_match"]
            nq = row(8, "APE adaptive")["n_questions"]
            d = row(8, "APE adaptive").get("vs_fixed")
            disc = (f"; paired: adaptive right where fixed is wrong on {d['only_adaptive']}, the reverse on "
                    f"{d['only_fixed']}" if d else "")
            lines.append(f"- 8 documents: APE adaptive {a:.4f} against APE fixed {f:.4f} of {nq} "
                         f"({'no loss' if a >= f else f'a loss of {f - a:.4f}, {round((f - a) * nq)} questions'}{disc}).")
        kl_rows = []
        for n in DOC_COUNTS:
            a, p = row(n, "APE adaptive"), row(n, "PARALLEL")
            if a and p and a.get("kl_to_sequential") is not None and p.get("kl_to_sequential") is not None:
                ka, kp = a["kl_to_sequential"], p["kl_to_sequential"]
                if max(ka, kp) < 1e-6:
                    kl_rows.append(f"{n}: {abs(ka):.3f} = {abs(kp):.3f} (both are SEQUENTIAL: one context at T = S = 1)")
                elif abs(ka - kp) < 1e-6 and a.get("T_S_used") == [(1.0, 1.0)]:
                    kl_rows.append(f"{n}: {ka:.4f} = {kp:.4f} (the row is T = S = 1, PARALLEL itself: no cell was "
                                   "closer to SEQUENTIAL beyond the noise on the validation split)")
                else:
                    kl_rows.append(f"{n}: {ka:.3f} {'<' if ka < kp else '>='} {kp:.3f}")
        if kl_rows:
            lines.append("- KL to SEQUENTIAL inside the window, APE adaptive against PARALLEL, by documents: "
                         + "; ".join(kl_rows) + ".")
            paired = []
            for n in DOC_COUNTS:
                a = row(n, "APE adaptive")
                k = a and a.get("kl_vs_parallel")
                if k and (k["closer"] or k["farther"]):
                    paired.append(f"{n}: {k['mean']:+.4f} +- {k['se']:.4f}, closer on {k['closer']:.2f} of the "
                                  f"questions and farther on {k['farther']:.2f}, the 5 farthest questions "
                                  f"{k['worst5']:+.2f} of the summed {k['mean'] * a['n_kl']:+.2f}")
            if paired:
                lines.append("  Paired per question (APE adaptive minus PARALLEL; mean +- one standard error): "
                             + "; ".join(paired) + ". Where the 5 farthest questions carry as much as the whole sum, "
                             "the sign of the mean is set by a handful of questions (those where a hard negative "
                             "competes with the answer).")
        lines.append("")
    stories = [r for r in records if r["exact_match"] is None]
    if stories:
        lines += ["## stories260K", "", f"{stories[0]['n_questions']} held-out prompts per row; APE T=0.90 S=0.90 (the "
                  "defaults: the model has no preset).", "",
                  "Next-token distribution after the query vs SEQUENTIAL (mean KL divergence / top-1 agreement):", "",
                  "| documents | " + " | ".join(v[0] for v in STORY_VARIANTS[1:]) + " |",
                  "|---:|" + "---:|" * (len(STORY_VARIANTS) - 1)]
        for n in STORY_DOC_COUNTS:
            row = {r["mode"]: r for r in stories if r["documents"] == n}
            lines.append(f"| {n} | " + " | ".join(f"{row[v[0]]['kl_to_sequential']:.4f} / {row[v[0]]['top1_agreement']:.2f}"
                                               for v in STORY_VARIANTS[1:]) + " |")
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
        modes = [v[0] for v in (VARIANTS if rs[0]["exact_match"] is not None else STORY_VARIANTS)]
        fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4))
        for ax, metric in zip(axes, metrics):
            for i, name in enumerate(modes):
                pts = sorted((r["documents"], r[metric]) for r in rs if r["mode"] == name and r[metric] is not None)
                if metric != "exact_match" and name == "SEQUENTIAL":
                    continue
                # One colour per mode in every panel (the legend is on the first).
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name, color=f"C{i}")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("documents per question")
            ax.set_title(metric + ("" if metric == "exact_match" else " (inside the window)"))
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{model}: parallel modes against SEQUENTIAL")
        fig.tight_layout()
        fig.savefig(f"{out_prefix}_{model.replace('.', '_')}.png", dpi=100)
        plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "apeserve-qa.gguf"))
    ap.add_argument("--preset", default="", help="the adaptive preset the decoder serves; default <model>.ape.json")
    ap.add_argument("--split", type=int, default=HELDOUT,
                    help=f"question split (harness.qa_examples seed): {HELDOUT}, the held-out split, unless you know "
                    f"why not; never {VALIDATION}, which calibrate.py fits the preset on")
    ap.add_argument("--questions", type=int, default=200)
    ap.add_argument("--more-questions", type=int, default=400,
                    help="questions per document count from --more-questions-from documents on")
    ap.add_argument("--more-questions-from", type=int, default=32,
                    help="where exact match is the target (32, 64: >= 0.90), runs of 100 vary by several points")
    ap.add_argument("--questions-for", nargs="*",
                    default=["2=2000", "3=2000", "4=2000", "8=2000", "32=800", "64=800", "128=100"], metavar="DOCS=N",
                    help="questions at these document counts instead (2-8: the rows closest to SEQUENTIAL differ from "
                    "T = S = 1 by 1-5%% in KL, carried by a few questions, which 200 questions do not resolve; 32 and "
                    "64: the 0.90 target)")
    ap.add_argument("--story-questions", type=int, default=30)
    ap.add_argument("--fixed-t", type=float, default=0.8, help="T of the fixed preset compared against")
    ap.add_argument("--fixed-s", type=float, default=0.9, help="S of the fixed preset compared against")
    ap.add_argument("--seq-max-docs", type=int, default=32)
    ap.add_argument("--noprefix-max-docs", type=int, default=8,
                    help="PARALLEL without a prefix up to this many documents (it needs its own encoding)")
    ap.add_argument("--bin-dir", default=default_bin_dir(),
                    help="folder of ape-encoder and ape-decoder (default $APE_BIN_DIR, else <repo>/build/bin)")
    ap.add_argument("--out", default=os.path.join(RESULTS, "quality"), help="output prefix for .md, .json, _*.png")
    ap.add_argument("--calibration", default=os.path.join(RESULTS, "calibration.json"))
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "apeserve-quality", "evaluate.jsonl"))
    ap.add_argument("--log", default="")
    ap.add_argument("--skip-stories", action="store_true")
    ap.add_argument("--prefetch", action="store_true",
                    help="only run and cache the variants that do not depend on the preset (all but APE adaptive), "
                    "e.g. while the preset is being calibrated; writes no report")
    ap.add_argument("--docs", type=int, nargs="+", default=DOC_COUNTS, help="document counts (default: all above)")
    args = ap.parse_args()
    if args.split == VALIDATION:
        ap.error("--split: the validation split is calibrate.py's; evaluating on it measures the fit, not the preset")
    DOC_COUNTS[:] = args.docs
    args.q_for = {int(k): int(v) for k, v in (x.split("=") for x in args.questions_for)}
    log = progress_logger(args.log)

    if args.preset and not os.path.exists(args.preset):
        ap.error(f"--preset {args.preset} does not exist")
    args.preset_path = args.preset or args.model + ".ape.json"
    preset = {}
    if os.path.exists(args.preset_path):
        with open(args.preset_path) as f:
            preset = json.load(f)
    st = os.stat(args.model)
    model_name = os.path.basename(args.model).replace(".gguf", "")
    # Cached outcomes belong to one model file; the adaptive variant's also
    # to one preset (the other variants do not depend on it, so a new preset
    # reruns only APE adaptive). Lines of the earlier format ("rec": every
    # variant, tagged with model and preset) are read as both parts.
    base_tag = f"{os.path.abspath(args.model)}:{st.st_size}:{int(st.st_mtime)}"
    ada_tag = f"{base_tag}:{json.dumps(preset, sort_keys=True)}"
    records, cache_f = open_result_cache(args.cache)
    cache = {"base": {}, "adaptive": {}}
    for r in records:
        tag, part = r.get("tag", ""), r.get("part")
        if part == "base" and tag == base_tag:
            cache["base"][r["key"]] = r["rec"]
        elif part == "adaptive" and tag == ada_tag:
            cache["adaptive"][r["key"]] = r["rec"]
        elif part is None and tag.startswith(base_tag + ":"):
            rec = r["rec"]
            name = "APE adaptive"
            ada = {"answers": {}, "kl": {}, "top1": {}}
            for k in ("answers", "kl", "top1"):
                if name in rec[k]:
                    ada[k][name] = rec[k].pop(name)
            for k in ("T_used", "S_used", "table_match"):
                if k in rec:
                    ada[k] = rec.pop(k)
            cache["base"][r["key"]] = rec
            if tag == ada_tag:
                cache["adaptive"][r["key"]] = ada

    def store(part, key, rec):
        cache_f.write(json.dumps({"tag": base_tag if part == "base" else ada_tag, "part": part, "key": key,
                                  "rec": rec}) + "\n")
        cache_f.flush()

    calibration = None
    if os.path.exists(args.calibration):
        with open(args.calibration) as f:
            calibration = json.load(f)
        if "groups" not in calibration:
            calibration = None  # the version-1 grid format
    records = []
    with Services(args.model, bin_dir=args.bin_dir, preset=args.preset or None) as svc:
        per_question, window = evaluate_qa(svc, model_name, args, preset, log, corpus_of(args.model), cache, store)
    if args.prefetch:
        return
    records += summarize(per_question, model_name, args, preset)
    gap = gap_analysis(per_question)
    if args.skip_stories:
        # Keep the previous run's stories260K rows (they do not depend on
        # the apeserve-qa preset).
        try:
            with open(args.out + ".json") as f:
                prev = json.load(f)
            records += [r for r in (prev["records"] if isinstance(prev, dict) else prev)
                        if r["model"] == "stories260K"]
        except (OSError, ValueError, KeyError):
            pass
    else:
        data = test_data_dir()
        with Services(os.path.join(data, "stories260K.bin"), os.path.join(data, "tok512.bin"),
                      bin_dir=args.bin_dir) as svc:
            records += evaluate_stories(svc, args.story_questions, 0.9, 0.9, log)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    write_outputs(records, gap, calibration, preset, args, window, args.out, load)
    log(f"wrote {args.out}.md, .json and plots")


if __name__ == "__main__":
    main()
