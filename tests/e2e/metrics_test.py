#!/usr/bin/python3
"""Prometheus metrics end to end: servers started with --metrics_listen are
scraped before and after a known set of requests, and every counter must
have moved by exactly what those requests did (requests by method and code,
cache hits and misses, encode-on-miss, tokens generated = tokens streamed,
Redis bytes written = the new entries' sizes, histogram counts); gauges
(model info, admission, streams) are present; channelz answers through
grpc_cli. The text must parse as Prometheus exposition format."""
import os
import re
import shutil
import subprocess
import sys
import time
import unittest
import urllib.error
import urllib.request

import grpc

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "clients", "python"))
from apeserve_client import load_stubs, make_channel, utf8  # noqa: E402
from apeserve_launcher import LocalServices, default_bin_dir, test_data_dir  # noqa: E402

BIN = default_bin_dir()
DATA = test_data_dir()
PREFIX = "Once upon a time"
DOCS = [" Lily had a big red ball.", " Tom had a dog. The dog liked to run in the park."]
SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def scrape(addr):
    """{(name, ((label, value), ...)): value} of http://addr/metrics, after
    checking every line is a comment or a sample."""
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4"), r.headers["Content-Type"]
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("# HELP ") or line.startswith("# TYPE "):
            continue
        m = SAMPLE.match(line)
        assert m, f"not a Prometheus sample: {line!r}"
        labels = tuple(sorted(LABEL.findall(m.group(3) or "")))
        out[(m.group(1), labels)] = float(m.group(4))
    return out


def value(metrics, name, **labels):
    """The sample of `name` whose labels include `labels` (0 if none); the
    sum when several match."""
    want = set(labels.items())
    return sum(v for (n, ls), v in metrics.items() if n == name and want <= set(ls))


class MetricsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.t0 = time.monotonic()
        cls.s = LocalServices(BIN, f"{DATA}/stories260K.bin", f"{DATA}/tok512.bin", metrics=True,
                              tmp_prefix="apeserve-metrics-").start()
        os.environ.setdefault("APESERVE_PY_GEN", os.path.join(cls.s.tmp, "py"))
        cls.enc_pb, cls.enc_grpc, cls.dec_pb, cls.dec_grpc = load_stubs()

    @classmethod
    def tearDownClass(cls):
        cls.s.stop()
        print(f"metrics_test: {time.monotonic() - cls.t0:.1f} s", file=sys.stderr)

    def generate(self, ch, refs, max_tokens=10):
        req = self.dec_pb.GenerateRequest(prefix=utf8(PREFIX), contexts=refs, query=utf8(" One day,"),
                                          max_tokens=max_tokens)
        msgs = list(self.dec_grpc.DecoderStub(ch).Generate(req, timeout=60))
        return sum(1 for m in msgs if m.HasField("token") and m.token.id >= 0)

    def test_counters_move_as_the_requests_did(self):
        enc0, dec0 = scrape(self.s.metrics["encoder"]), scrape(self.s.metrics["decoder"])
        with make_channel(self.s.encoder) as ch:
            resp = self.enc_grpc.EncoderStub(ch).Encode(self.enc_pb.EncodeRequest(
                prefix=self.enc_pb.Segment(text=utf8(PREFIX)), contexts=[self.enc_pb.Segment(text=utf8(d))
                                                                         for d in DOCS]), timeout=60)
            info = self.enc_grpc.EncoderStub(ch).ModelInfo(self.enc_pb.ModelInfoRequest(), timeout=30)
        written = resp.prefix.stored_bytes + sum(c.stored_bytes for c in resp.contexts)
        keys = [self.dec_pb.ContextRef(key=utf8(c.key)) for c in resp.contexts]
        streamed = 0
        with make_channel(self.s.decoder) as ch:
            for n in (6, 9, 12):  # 3 by key: cache hits
                streamed += self.generate(ch, keys, n)
            new_doc = " Sue saw a big cat in the tree."
            streamed += self.generate(ch, [self.dec_pb.ContextRef(text=utf8(new_doc))], 7)  # a miss: encoded
            with self.assertRaises(grpc.RpcError) as cm:  # invalid: counted by its code
                self.generate(ch, keys, 10 ** 6)
            self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        enc1, dec1 = scrape(self.s.metrics["encoder"]), scrape(self.s.metrics["decoder"])

        def delta(after, before, name, **labels):
            return value(after, name, **labels) - value(before, name, **labels)

        # Requests by method and code.
        self.assertEqual(delta(dec1, dec0, "ape_requests_total", method="Generate", code="OK"), 4)
        self.assertEqual(delta(dec1, dec0, "ape_requests_total", method="Generate", code="INVALID_ARGUMENT"), 1)
        self.assertEqual(delta(enc1, enc0, "ape_requests_total", server="encoder", method="Encode", code="OK"), 2)
        self.assertEqual(delta(enc1, enc0, "ape_requests_total", method="ModelInfo", code="OK"), 1)
        # Cache: 3 hits, 1 miss encoded through --encoder.
        self.assertEqual(delta(dec1, dec0, "ape_decoder_cache_lookups_total", result="hit"), 3)
        self.assertEqual(delta(dec1, dec0, "ape_decoder_cache_lookups_total", result="miss"), 1)
        self.assertEqual(delta(dec1, dec0, "ape_decoder_encode_on_miss_total"), 1)
        self.assertEqual(delta(dec1, dec0, "ape_decoder_encode_on_miss_contexts_total"), 1)
        self.assertGreater(delta(dec1, dec0, "ape_decoder_cache_tokens_total", source="encoded"), 0)
        # The 3 hits whole, and the miss's prefix (cached; only its context was encoded).
        hit_tokens = 3 * (resp.prefix.num_tokens + sum(c.num_tokens for c in resp.contexts)) + resp.prefix.num_tokens
        self.assertEqual(delta(dec1, dec0, "ape_decoder_cache_tokens_total", source="cache"), hit_tokens)
        self.assertEqual(delta(enc1, enc0, "ape_encoder_contexts_total", result="computed"), 3)
        # Tokens: the counter equals what was streamed.
        self.assertEqual(delta(dec1, dec0, "ape_decoder_tokens_generated_total"), streamed)
        self.assertEqual(streamed, 6 + 9 + 12 + 7)
        self.assertEqual(delta(dec1, dec0, "ape_decoder_time_to_first_token_seconds_count"), 4)
        self.assertEqual(delta(dec1, dec0, "ape_decoder_inter_token_seconds_count"), streamed - 4)
        self.assertEqual(delta(dec1, dec0, "ape_decoder_prefill_seconds_count"), 4)
        self.assertEqual(value(dec1, "ape_decoder_time_to_first_token_seconds_bucket", le="+Inf"),
                         value(dec1, "ape_decoder_time_to_first_token_seconds_count"))
        # Redis: the encoder wrote exactly the new entries (2 by Encode + the on-miss one, which
        # the decoder then read back); the decoder read at least the entries of the 3 hits.
        self.assertGreater(delta(enc1, enc0, "ape_redis_written_bytes_total"), written)
        self.assertEqual(delta(dec1, dec0, "ape_redis_written_bytes_total"), 0)
        self.assertGreaterEqual(delta(dec1, dec0, "ape_redis_read_bytes_total"), 3 * written)
        self.assertGreater(delta(dec1, dec0, "ape_redis_call_seconds_count", op="read"), 3)
        self.assertEqual(delta(enc1, enc0, "ape_redis_call_seconds_count", op="put"), 4)  # prefix + 2 + on-miss
        # Gauges.
        for m, server in ((dec1, "decoder"), (enc1, "encoder")):
            self.assertEqual(value(m, "ape_model_info", server=server, fingerprint=info.fingerprint,
                                   architecture=info.architecture), 1)
            self.assertIn(("ape_admission_running", (("server", server),)), m)
            self.assertEqual(value(m, "ape_admission_waiting", server=server), 0)
        self.assertEqual(value(dec1, "ape_decoder_active_streams"), 0)

    def test_exact_written_bytes(self):
        enc0 = scrape(self.s.metrics["encoder"])
        with make_channel(self.s.encoder) as ch:
            resp = self.enc_grpc.EncoderStub(ch).Encode(self.enc_pb.EncodeRequest(
                prefix=self.enc_pb.Segment(text=utf8("A brand new prefix")),
                contexts=[self.enc_pb.Segment(text=utf8(" Ben ate an apple."))]), timeout=60)
        enc1 = scrape(self.s.metrics["encoder"])
        written = resp.prefix.stored_bytes + resp.contexts[0].stored_bytes
        self.assertEqual(value(enc1, "ape_redis_written_bytes_total") - value(enc0, "ape_redis_written_bytes_total"),
                         written)

    def test_not_found_and_channelz(self):
        with self.assertRaises(urllib.error.HTTPError) as cm:
            urllib.request.urlopen(f"http://{self.s.metrics['decoder']}/other", timeout=10)
        self.assertEqual(cm.exception.code, 404)
        cli = shutil.which("grpc_cli")
        self.assertIsNotNone(cli, "grpc_cli not found: run deploy/build-grpc-cli.sh")
        r = subprocess.run([cli, "ls", self.s.decoder], capture_output=True, text=True, timeout=60)
        self.assertIn("grpc.channelz.v1.Channelz", r.stdout.split())
        r = subprocess.run([cli, "call", self.s.decoder, "grpc.channelz.v1.Channelz.GetServers", ""],
                           capture_output=True, text=True, timeout=60)
        self.assertEqual(r.returncode, 0, r.stderr)
        calls = [int(n) for n in re.findall(r"calls_succeeded: (\d+)", r.stdout)]
        self.assertTrue(calls and calls[0] > 0, r.stdout)

    def test_bad_metrics_listen_refuses_to_start(self):
        r = subprocess.run([f"{BIN}/ape-encoder", f"--model={DATA}/stories260K.bin", f"--tokenizer={DATA}/tok512.bin",
                            "--listen=127.0.0.1:0", "--redis=redis://127.0.0.1:1", "--metrics_listen=nonsense"],
                           capture_output=True, text=True, timeout=60)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("--metrics_listen=nonsense", r.stderr)


if __name__ == "__main__":
    unittest.main(verbosity=2)
