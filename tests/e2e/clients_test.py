#!/usr/bin/python3
"""Clients end to end: grpc_cli, the Python and Node.js clients and apectl
against real servers (redis-server, ape-encoder, ape-decoder on free
loopback ports). Every client must give the same greedy answer, also for
non-ASCII text (request text travels as UTF-8 bytes)."""
import os
import shutil
import subprocess
import sys
import unittest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "clients", "python"))
from apeserve_client import load_stubs, make_channel, utf8  # noqa: E402
from apeserve_launcher import LocalServices, default_bin_dir, test_data_dir  # noqa: E402

BIN = default_bin_dir()  # $APE_BIN_DIR, else build/bin
DATA = test_data_dir()  # $APE_TEST_DATA, else tests/data
PREFIX = "Once upon a time"
DOCS = [" there was a girl named Lily. She had a big red ball.", " Tom had a dog. The dog liked to run in the park."]
QUERY = " One day, Lily"
UTF8_DOC = " Zoë had a naïve cat. The cat liked crème brûlée."  # non-ASCII: must reach the server as UTF-8


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


class ClientsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.services = LocalServices(BIN, f"{DATA}/stories260K.bin", f"{DATA}/tok512.bin",
                                     tmp_prefix="apeserve-clients-").start()
        cls.tmp, cls.enc, cls.dec = cls.services.tmp, cls.services.encoder, cls.services.decoder
        cls.doc_files = []
        for i, d in enumerate(DOCS + [UTF8_DOC]):
            path = os.path.join(cls.tmp, f"doc{i}.txt")
            with open(path, "w", encoding="utf-8") as f:
                f.write(d)
            cls.doc_files.append(path)
        cls.utf8_file = cls.doc_files.pop()
        cls.grpc_cli = shutil.which("grpc_cli")

    @classmethod
    def tearDownClass(cls):
        cls.services.stop()

    def apectl_answer(self, doc_files=None):
        r = run([f"{BIN}/apectl", "generate", f"--decoder={self.dec}", f"--prefix={PREFIX}",
                 "--context-file=" + ",".join(doc_files or self.doc_files), f"--query={QUERY}", "--max-tokens=16"])
        self.assertEqual(r.returncode, 0, r.stderr)
        return r.stdout.rstrip("\n")

    def test_grpc_cli_lists_describes_and_calls(self):
        self.assertIsNotNone(self.grpc_cli, "grpc_cli not found: run deploy/build-grpc-cli.sh")
        for addr, svc, methods in [(self.enc, "ape.v1.Encoder", ["Encode", "Tokenize", "Detokenize", "ModelInfo"]),
                                   (self.dec, "ape.v1.Decoder", ["Generate", "ModelInfo"])]:
            r = run([self.grpc_cli, "ls", addr, "-l"])
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertIn(f"service {svc.split('.')[-1]}", r.stdout)
            for m in methods:
                self.assertIn(f"rpc {m}(", r.stdout)
        r = run([self.grpc_cli, "type", self.dec, "ape.v1.GenerateRequest"])
        self.assertIn("repeated .ape.v1.ContextRef contexts", r.stdout)
        r = run([self.grpc_cli, "call", self.enc, "ape.v1.Encoder.Encode",
                 f'prefix: {{text: "{PREFIX}"}} contexts: {{text: "{DOCS[0]}"}}'])
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn('key: "ape:v1:kv:', r.stdout)
        r = run([self.grpc_cli, "call", self.dec, "ape.v1.Decoder.Generate",
                 f'prefix: "{PREFIX}" contexts: {{text: "{DOCS[0]}"}} contexts: {{text: "{DOCS[1]}"}} '
                 f'query: "{QUERY}" max_tokens: 16'])
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn('finish_reason: "length"', r.stdout)
        streamed, block = "", None
        for line in r.stdout.splitlines():  # text format: token { ... } blocks, then final { ... }
            if line.endswith("{") and not line.startswith(" "):
                block = line.split()[0]
            elif line == "}":
                block = None
            elif block == "token" and line.startswith("  text: "):
                streamed += bytes(line[len("  text: "):].strip('"'), "utf-8").decode("unicode_escape")
        self.assertEqual(streamed, self.apectl_answer())

    def test_health_serving(self):
        self.assertIsNotNone(self.grpc_cli, "grpc_cli not found: run deploy/build-grpc-cli.sh")
        for addr in (self.enc, self.dec):
            r = run([self.grpc_cli, "call", addr, "grpc.health.v1.Health.Check", "", "--noremotedb",
                     f"--proto_path={ROOT}/proto", "--protofiles=grpc/health/v1/health.proto"])
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertIn("status: SERVING", r.stdout)

    def test_python_client_equals_apectl(self):
        r = run(["/usr/bin/python3", f"{ROOT}/clients/python/apeserve_client.py", f"--encoder={self.enc}",
                 f"--decoder={self.dec}", f"--prefix={PREFIX}", "--doc", self.doc_files[0], "--doc", self.doc_files[1],
                 f"--query={QUERY}", "--max-tokens=16"], env=dict(os.environ, APESERVE_PY_GEN=os.path.join(self.tmp, "py")))
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout.rstrip("\n"), self.apectl_answer())
        self.assertIn("finish=length", r.stderr)

    def test_node_client_equals_apectl(self):
        self.assertTrue(os.path.isdir(f"{ROOT}/clients/node/node_modules"), "run npm ci in clients/node")
        r = run(["node", f"{ROOT}/clients/node/client.js", "--encoder", self.enc, "--decoder", self.dec,
                 "--prefix", PREFIX, "--doc", self.doc_files[0], "--doc", self.doc_files[1], "--query", QUERY,
                 "--max-tokens", "16"])
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout.rstrip("\n"), self.apectl_answer())

    def test_non_ascii_text_same_in_every_client(self):
        expected = self.apectl_answer([self.utf8_file])
        r = run(["/usr/bin/python3", f"{ROOT}/clients/python/apeserve_client.py", f"--encoder={self.enc}",
                 f"--decoder={self.dec}", f"--prefix={PREFIX}", "--doc", self.utf8_file, f"--query={QUERY}",
                 "--max-tokens=16"], env=dict(os.environ, APESERVE_PY_GEN=os.path.join(self.tmp, "py")))
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout.rstrip("\n"), expected)
        if os.path.isdir(f"{ROOT}/clients/node/node_modules"):
            r = run(["node", f"{ROOT}/clients/node/client.js", "--encoder", self.enc, "--decoder", self.dec,
                     "--prefix", PREFIX, "--doc", self.utf8_file, "--query", QUERY, "--max-tokens", "16"])
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertEqual(r.stdout.rstrip("\n"), expected)

    def test_python_stubs_send_text_as_utf8_bytes(self):
        os.environ.setdefault("APESERVE_PY_GEN", os.path.join(self.tmp, "py"))
        enc_pb, enc_grpc, dec_pb, dec_grpc = load_stubs()
        with make_channel(self.enc) as ch:
            enc = enc_grpc.EncoderStub(ch)
            resp = enc.Encode(enc_pb.EncodeRequest(prefix=enc_pb.Segment(text=utf8(PREFIX)),
                                                   contexts=[enc_pb.Segment(text=utf8(UTF8_DOC))]), timeout=60)
            ids = enc.Tokenize(enc_pb.TokenizeRequest(text=utf8(UTF8_DOC)), timeout=60).ids
        self.assertEqual(resp.contexts[0].num_tokens, len(ids))
        answers = []
        with make_channel(self.dec) as ch:
            for ref in (dec_pb.ContextRef(key=utf8(resp.contexts[0].key)), dec_pb.ContextRef(text=utf8(UTF8_DOC))):
                msgs = list(dec_grpc.DecoderStub(ch).Generate(dec_pb.GenerateRequest(
                    prefix=utf8(PREFIX), contexts=[ref], query=utf8(QUERY), max_tokens=16, stop=[utf8("\u00e9t\u00e9")]),
                    timeout=60))
                self.assertEqual(msgs[-1].final.usage.encoded_tokens, 0)  # by text: the same key, found cached
                answers.append("".join(m.token.text for m in msgs if m.HasField("token")))
        self.assertEqual(answers[0], answers[1])
        self.assertEqual(answers[0], self.apectl_answer([self.utf8_file]))


if __name__ == "__main__":
    unittest.main(verbosity=2)
