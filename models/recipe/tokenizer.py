"""The model's own SentencePiece-style vocabulary, exported into the GGUF.

Pieces: <unk>, <s>, </s>, the 256 byte-fallback pieces <0x00>..<0xFF>, every
single character of the corpus, and for every corpus word w the pieces
"\u2581" + w[:k] for k = 1..len(w), scored by length. With those scores,
SentencePiece BPE (apeserve's tokenizer, llama.cpp's) merges each word left
to right into exactly one token, so `encode_words` below (fast, used for
training data) equals the generic algorithm `encode_bpe` (checked on a sample
at build time).
"""
SPACE = "\u2581"


class Vocab:
    def __init__(self, words):
        pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
        types = [2, 3, 3] + [6] * 256
        scores = [0.0] * len(pieces)
        chars = sorted({c for w in words for c in w} | {SPACE})
        for c in chars:
            pieces.append(c)
            types.append(1)
            scores.append(-1000.0)
        seen = set(pieces)
        for w in words:
            for k in range(1, len(w) + 1):
                p = SPACE + w[:k]
                if p not in seen:
                    seen.add(p)
                    pieces.append(p)
                    types.append(1)
                    scores.append(float(k))
        self.pieces, self.types, self.scores = pieces, types, scores
        self.index = {p: i for i, p in enumerate(pieces)}
        self.bos, self.eos = 1, 2

    def __len__(self):
        return len(self.pieces)

    def encode_words(self, text):
        """Fast path for corpus text: every word is a whole piece."""
        return [self.index[SPACE + w] for w in text.split(" ") if w]

    def encode_bpe(self, text):
        """Generic SentencePiece BPE with byte fallback (reference)."""
        s = SPACE + text.replace(" ", SPACE) if text else ""
        syms = list(s)
        while True:
            best, best_i = None, -1
            for i in range(len(syms) - 1):
                j = self.index.get(syms[i] + syms[i + 1])
                if j is not None and (best is None or self.scores[j] > best):
                    best, best_i = self.scores[j], i
            if best_i < 0:
                break
            syms[best_i:best_i + 2] = [syms[best_i] + syms[best_i + 1]]
        out = []
        for p in syms:
            if p in self.index:
                out.append(self.index[p])
            else:
                out.extend(3 + b for b in p.encode("utf-8"))
        return out

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids if self.types[i] == 1).replace(SPACE, " ")
