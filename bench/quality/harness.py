"""Shared pieces of the quality tools: starting (or reaching) the services,
the held-out data, and scoring one question in one mode over gRPC."""
import math
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "clients", "python"))
sys.path.insert(0, os.path.join(ROOT, "models", "recipe"))
from apeserve_client import load_stubs  # noqa: E402

enc_pb, enc_grpc, dec_pb, dec_grpc = load_stubs()
import grpc  # noqa: E402

MODES = {"SEQUENTIAL": dec_pb.MODE_SEQUENTIAL, "PARALLEL": dec_pb.MODE_PARALLEL, "APE": dec_pb.MODE_APE}


def _free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Services:
    """redis-server + ape-encoder + ape-decoder on free loopback ports, or
    existing ones when addresses are given."""

    def __init__(self, model, tokenizer="", encoder=None, decoder=None, bin_dir=None, preset=None):
        self.procs, self.tmp = [], None
        if encoder and decoder:
            self.encoder, self.decoder = encoder, decoder
        else:
            bin_dir = bin_dir or os.path.join(ROOT, "build", "bin")
            self.tmp = tempfile.mkdtemp(prefix="apeserve-quality-")
            rp, ep, dp = _free_port(), _free_port(), _free_port()
            self.encoder, self.decoder = f"127.0.0.1:{ep}", f"127.0.0.1:{dp}"
            margs = [f"--model={model}", f"--redis=redis://127.0.0.1:{rp}", "--max_context_tokens=4096"]
            if tokenizer:
                margs.append(f"--tokenizer={tokenizer}")
            self._start(["redis-server", "--port", str(rp), "--bind", "127.0.0.1", "--save", "", "--dir", self.tmp], rp, "redis")
            self._start([f"{bin_dir}/ape-encoder", f"--listen={self.encoder}"] + margs, ep, "encoder")
            dargs = [f"--ape_preset={preset}"] if preset else []
            self._start([f"{bin_dir}/ape-decoder", f"--listen={self.decoder}", f"--encoder={self.encoder}",
                         "--max_prompt_tokens=1000000"] + margs + dargs, dp, "decoder")
        opts = [("grpc.max_receive_message_length", 64 << 20)]
        self.enc = enc_grpc.EncoderStub(grpc.insecure_channel(self.encoder, options=opts))
        self.dec = dec_grpc.DecoderStub(grpc.insecure_channel(self.decoder, options=opts))

    def _start(self, cmd, port, name):
        log = open(os.path.join(self.tmp, name + ".log"), "w")
        p = subprocess.Popen(cmd, stdout=log, stderr=log)
        self.procs.append(p)
        for _ in range(400):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return
            except OSError:
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited, see {self.tmp}/{name}.log")
                time.sleep(0.05)
        raise RuntimeError(f"{name} did not start")

    def close(self):
        for p in reversed(self.procs):
            p.terminate()
            p.wait(timeout=10)
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def encode(self, prefix, docs):
        r = self.enc.Encode(enc_pb.EncodeRequest(prefix=enc_pb.Segment(text=prefix),
                                                 contexts=[enc_pb.Segment(text=d) for d in docs]), timeout=600)
        return [c.key for c in r.contexts]

    def request(self, prefix, keys, query, mode, T=None, S=None, max_tokens=8, stop=()):
        req = dec_pb.GenerateRequest(prefix=prefix, contexts=[dec_pb.ContextRef(key=k) for k in keys], query=query,
                                     mode=MODES[mode], max_tokens=max_tokens, stop=list(stop))
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

    def score(self, req):
        return list(self.dec.Score(req, timeout=600).logprobs)


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


def qa_examples(n_docs, n, seed, corpus=("varied", 1234)):
    """Held-out questions: a seed range the training never uses (training
    draws from random.Random(<world seed>) onwards; these use 10**6 + ...)."""
    from corpus import World, make_example
    world = World(seed=corpus[1], style=corpus[0])
    rng = random.Random(10**6 + seed * 1000 + n_docs)
    return [make_example(world, rng, n_docs, 1) for _ in range(n)]
