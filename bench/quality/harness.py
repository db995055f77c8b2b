"""Shared pieces of the quality tools: starting (or reaching) the services,
the held-out data, how an answer is cut and compared, and scoring one
question in one mode over gRPC.

Importing this module runs nothing: the gRPC stubs are generated (protoc)
the first time Services is created, or by calling stubs()."""
import json
import math
import os
import random
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
for _p in (os.path.join(ROOT, "clients", "python"), os.path.join(ROOT, "models", "recipe")):
    if _p not in sys.path:
        sys.path.insert(0, _p)
from apeserve_client import load_stubs, make_channel, utf8  # noqa: E402
from apeserve_launcher import LocalServices, default_bin_dir, use_port_range  # noqa: E402

MODES = ("SEQUENTIAL", "PARALLEL", "APE")
# Every corpus answer restates the fact and ends with ANSWER_STOP ("Neub
# lives in Quenmar ."); generation stops there, within ANSWER_MAX_TOKENS.
ANSWER_STOP = " ."
ANSWER_MAX_TOKENS = 12

_stubs = None


# APE_PORT_RANGE="LO-HI": the servers' loopback ports come from that range.
use_port_range(os.environ.get("APE_PORT_RANGE", ""))


def stubs():
    """(encoder_pb2, encoder_pb2_grpc, decoder_pb2, decoder_pb2_grpc),
    generated on first use."""
    global _stubs
    if _stubs is None:
        _stubs = load_stubs()
    return _stubs


def cut_answer(text, stop=ANSWER_STOP):
    """An answer as exact match compares it: the text before the first
    `stop`, stripped. The one rule for generated answers and for the
    corpus's reference answers alike."""
    i = text.find(stop)
    return (text if i < 0 else text[:i]).strip()


def answer_lead(answer, value):
    """The answer's restating words before its value: "Neub lives in" for
    ("Neub lives in Quenmar .", "Quenmar"), where distributions are compared."""
    return answer[:answer.index(" " + value + " ")]


class Services:
    """redis-server + ape-encoder + ape-decoder on free loopback ports
    (apeserve_launcher.LocalServices), or existing ones when both addresses
    are given (over TLS with `credentials`, apeserve_client's
    channel_credentials()). A context manager; close() stops what it started."""

    def __init__(self, model, tokenizer="", encoder=None, decoder=None, bin_dir=None, preset=None, credentials=None,
                 server_name=None):
        enc_pb, enc_grpc, dec_pb, dec_grpc = stubs()
        self.local = None
        if encoder and decoder:
            self.encoder, self.decoder = encoder, decoder
        else:
            self.local = LocalServices(
                bin_dir or default_bin_dir(), model, tokenizer, tmp_prefix="apeserve-quality-",
                # Quality runs go past the trained window on purpose (SEQUENTIAL over
                # 32+ documents is the baseline APE is measured against).
                encoder_args=["--max_context_tokens=4096", "--max_positions=1000000", "--max_contexts=256"],
                decoder_args=["--max_context_tokens=4096", "--max_positions=1000000"]
                + ([f"--ape_preset={preset}"] if preset else [])).start()
            self.encoder, self.decoder = self.local.encoder, self.local.decoder
        opts = [("grpc.max_receive_message_length", 64 << 20)]
        self._channels = [make_channel(self.encoder, credentials, server_name, opts),
                          make_channel(self.decoder, credentials, server_name, opts)]
        self.enc = enc_grpc.EncoderStub(self._channels[0])
        self.dec = dec_grpc.DecoderStub(self._channels[1])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self):
        for ch in self._channels:
            ch.close()
        self._channels = []
        if self.local:
            self.local.stop()
            self.local = None

    def encode(self, prefix, docs):
        return self.encode_entries(prefix, docs)[0]

    def encode_entries(self, prefix, docs):
        """(context keys, prefix tokens, [tokens of each context])."""
        enc_pb = stubs()[0]
        r = self.enc.Encode(enc_pb.EncodeRequest(prefix=enc_pb.Segment(text=utf8(prefix)),
                                                 contexts=[enc_pb.Segment(text=utf8(d)) for d in docs]), timeout=600)
        return [c.key for c in r.contexts], r.prefix.num_tokens, [c.num_tokens for c in r.contexts]

    def window(self):
        """The model's trained window in tokens (ModelInfo.context_length)."""
        enc_pb = stubs()[0]
        return self.enc.ModelInfo(enc_pb.ModelInfoRequest(), timeout=60).context_length

    def request(self, prefix, keys, query, mode, T=None, S=None, max_tokens=8, stop=()):
        dec_pb = stubs()[2]
        # Request text goes as UTF-8 bytes (the API's text fields are `bytes`).
        req = dec_pb.GenerateRequest(prefix=utf8(prefix), contexts=[dec_pb.ContextRef(key=utf8(k)) for k in keys],
                                     query=utf8(query), mode=getattr(dec_pb, "MODE_" + mode), max_tokens=max_tokens,
                                     stop=[utf8(s) for s in stop])
        if T:
            req.ape_temperature = T
        if S:
            req.ape_scale = S
        return req

    def generate(self, req):
        text = ""
        for msg in self.dec.Generate(req, timeout=600):
            if msg.HasField("token"):
                text += msg.token.text
        return text

    def generate_final(self, req):
        """(generated text, the stream's Final message)."""
        text, final = "", None
        for msg in self.dec.Generate(req, timeout=600):
            if msg.HasField("token"):
                text += msg.token.text
            elif msg.HasField("final"):
                final = msg.final
        return text, final

    def answer(self, prefix, keys, query, mode, T=None, S=None):
        """The greedy answer to a corpus question, cut by cut_answer."""
        return self.answer_final(prefix, keys, query, mode, T, S)[0]

    def answer_final(self, prefix, keys, query, mode, T=None, S=None):
        """(the greedy answer cut by cut_answer, Final: T and S used, usage)."""
        req = self.request(prefix, keys, query, mode, T, S, max_tokens=ANSWER_MAX_TOKENS, stop=[ANSWER_STOP])
        text, final = self.generate_final(req)
        return cut_answer(text), final

    def score(self, req):
        return list(self.dec.Score(req, timeout=600).logprobs)

    def score_full(self, req):
        """(log-probabilities after the query, prompt tokens)."""
        r = self.dec.Score(req, timeout=600)
        return list(r.logprobs), r.usage.prompt_tokens


def open_result_cache(path):
    """The records of a JSON-lines result cache (a line cut by an interrupted
    run is skipped), and the file opened for appending new ones."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    records = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except ValueError:
                    continue
    return records, open(path, "a")


def progress_logger(path=""):
    """A log(line) function: each line time-stamped to stderr, and appended
    to `path` too when one is given (long runs, tailed from elsewhere)."""
    logf = open(path, "a") if path else None

    def log(s):
        line = time.strftime("%H:%M:%S ") + s
        print(line, file=sys.stderr, flush=True)
        if logf:
            logf.write(line + "\n")
            logf.flush()
    return log


def kl(p_log, q_log):
    """KL(P || Q) for log-probability vectors."""
    return sum(math.exp(a) * (a - b) for a, b in zip(p_log, q_log) if a > -60)


def argmax(v):
    return max(range(len(v)), key=v.__getitem__)


def corpus_of(model_path):
    """(fact phrasing, world seed) the model was trained on, from its GGUF
    metadata; models exported before the keys existed used ("varied", 1234)."""
    from gguf_export import read_string_kvs
    kv = read_string_kvs(model_path)
    return kv.get("apeserve.corpus.facts", "varied"), int(kv.get("apeserve.corpus.seed", "1234"))


# The question splits, each its own seed range (qa_examples: 10**6 +
# seed * 1000 + documents). Training draws from random.Random(<world seed>)
# onwards and its checkpoint accuracy from 999 * 1000 + documents, so none
# of these meets it. HELDOUT_V1 was the held-out split until 2026-11-27: three
# preset tables were compared on it, so it is spent as a test set and no
# tool reads it by default.
HELDOUT_V1 = 1
VALIDATION = 2  # calibrate.py fits the preset on this split only
HELDOUT = 3     # evaluate.py reports on this split only


def qa_examples(n_docs, n, seed, corpus=("varied", 1234)):
    """Questions of one split (`seed`: HELDOUT, VALIDATION, ...): a seed
    range the training never uses (training draws from random.Random(<world
    seed>) onwards; these use 10**6 + seed * 1000 + n_docs). The first n of
    a split do not depend on n."""
    assert 0 < n_docs < 1000, n_docs  # keeps the splits' seed ranges apart
    from corpus import World, make_example
    world = World(seed=corpus[1], style=corpus[0])
    rng = random.Random(10**6 + seed * 1000 + n_docs)
    return [make_example(world, rng, n_docs, 1) for _ in range(n)]
