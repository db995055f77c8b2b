#!/usr/bin/python3
"""models/recipe/widen.py: the widened apeserve-qa computes what the original
does, and every matrix of it can be Q4_K.

The original and the widened F32 files must give the same greedy ids
(`apectl run`, 16 tokens) on prompts over the demo's documents; then
`apectl quantize --type Q4_K` of the widened file must keep every matrix in
Q4_K (no Q8_0 fallback: rows are whole 256-blocks), and that file must still
answer the demo's first question right by SEQUENTIAL prefill.
"""
import os
import re
import subprocess
import sys
import tempfile
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.environ.get("APE_BIN_DIR", os.path.join(ROOT, "build", "bin"))
MODEL = os.path.join(ROOT, "models", "apeserve-qa.gguf")
DOCS = os.path.join(ROOT, "deploy", "local", "docs")
PREFIX = "You answer questions about the documents below ."


def run(*args):
    r = subprocess.run(args, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise AssertionError(f"{args[0]} failed ({r.returncode}): {r.stderr}")
    return r.stdout + r.stderr


def greedy_ids(model, prompt):
    out = run(os.path.join(BIN, "apectl"), "run", "--model", model, "--prompt", prompt, "--max-tokens", "16",
              "--temperature", "0", "--print-ids")
    m = re.search(r"^([0-9]+(?:,[0-9]+)*)", out, re.M)
    if not m:
        raise AssertionError(f"no ids in apectl output: {out}")
    return [int(x) for x in m.group(1).split(",")]


def doc(name):
    with open(os.path.join(DOCS, name), encoding="utf-8") as f:
        return f.read().strip()


class WidenTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.wide = os.path.join(cls.tmp.name, "apeserve-qa-w256.gguf")
        run("/usr/bin/python3", os.path.join(ROOT, "models", "recipe", "widen.py"), "--in", MODEL, "--out", cls.wide)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def test_same_greedy_ids(self):
        prompts = [
            f"{PREFIX} {doc('doc1.txt')} {doc('doc2.txt')} question : what city does Neub visit ? answer :",
            f"{PREFIX} {doc('doc3.txt')} {doc('doc4.txt')} {doc('doc5.txt')} question : what did Corzan become ? "
            "answer :",
            f"{PREFIX} {doc('doc6.txt')} question : when did Ishsul arrive ? answer : Ishsul arrived",
        ]
        for p in prompts:
            with self.subTest(prompt=p[-40:]):
                self.assertEqual(greedy_ids(MODEL, p), greedy_ids(self.wide, p))

    def test_q4_k_everywhere(self):
        q = os.path.join(self.tmp.name, "apeserve-qa-w256-Q4_K.gguf")
        run(os.path.join(BIN, "apectl"), "quantize", "--model", self.wide, "--out", q, "--type", "Q4_K")
        info = run(os.path.join(BIN, "apectl"), "info", "--model", q)
        types = re.search(r"^weights:\s+(.*)$", info, re.M).group(1)
        self.assertIn("Q4_K x29", types)  # 4 layers x 7 matrices + the (tied) embedding
        self.assertNotIn("Q8_0", types)
        prompt = f"{PREFIX} {doc('doc2.txt')} question : what city does Neub visit ? answer :"
        out = run(os.path.join(BIN, "apectl"), "run", "--model", q, "--prompt", prompt, "--max-tokens", "4",
                  "--temperature", "0")
        self.assertIn("Neub visits Cormiish", out)


if __name__ == "__main__":
    unittest.main(argv=sys.argv[:1], verbosity=2)
