#!/usr/bin/python3
"""apeserve's tokenizer (apectl tokenize) gives the recipe's ids for corpus
text, both the recipe's fast word path and its SentencePiece BPE.
  recipe_tokenizer_check.py APECTL MODEL.gguf SEED"""
import os
import random
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "models", "recipe"))
from corpus import PREFIX, World, make_example, query_text  # noqa: E402
from tokenizer import Vocab  # noqa: E402

apectl, model, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
w = World(seed)
v = Vocab(w.words())
rng = random.Random(11)
texts = [PREFIX]
for _ in range(5):
    ex = make_example(w, rng, 3, 1)
    texts += ex["docs"] + [query_text(ex["qa"][0][0]), ex["qa"][0][1]]
out = subprocess.run([apectl, "tokenize", "--model", model] + texts, capture_output=True, text=True, check=True).stdout
got = [list(map(int, line.split())) for line in out.splitlines()]
assert len(got) == len(texts)
for t, g in zip(texts, got):
    assert g == v.encode_words(t) == v.encode_bpe(t), (t, g, v.encode_words(t))
print(f"tokenizer: {len(texts)} corpus texts agree")
