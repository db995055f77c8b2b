#!/usr/bin/python3
"""Clients end to end: grpc_cli, the Python and Node.js clients and apectl
against real servers (redis-server, ape-encoder, ape-decoder on free
loopback ports). Every client must give the same greedy answer."""
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import unittest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BIN = os.environ.get("APE_BIN_DIR", os.path.join(ROOT, "build", "bin"))
SHARED = os.environ.get("APE_SHARED_MODELS", os.path.join(ROOT, "..", "shared", "models"))
PREFIX = "Once upon a time"
DOCS = [" there was a girl named Lily. She had a big red ball.", " Tom had a dog. The dog liked to run in the park."]
QUERY = " One day, Lily"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port, proc, name):
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited")
            time.sleep(0.05)
    raise RuntimeError(f"{name} did not listen on {port}")


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


class ClientsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="apeserve-clients-")
        cls.procs = []
        rp, ep, dp = free_port(), free_port(), free_port()
        cls.enc, cls.dec = f"127.0.0.1:{ep}", f"127.0.0.1:{dp}"

        def start(cmd, port, name):
            log = open(os.path.join(cls.tmp, name + ".log"), "w")
            p = subprocess.Popen(cmd, stdout=log, stderr=log)
            cls.procs.append(p)
            wait_port(port, p, name)

        start(["redis-server", "--port", str(rp), "--bind", "127.0.0.1", "--save", "", "--dir", cls.tmp], rp, "redis")
        model = [f"--model={SHARED}/stories260K.bin", f"--tokenizer={SHARED}/tok512.bin", f"--redis=redis://127.0.0.1:{rp}"]
        start([f"{BIN}/ape-encoder", f"--listen={cls.enc}"] + model, ep, "encoder")
        start([f"{BIN}/ape-decoder", f"--listen={cls.dec}", f"--encoder={cls.enc}"] + model, dp, "decoder")
        cls.doc_files = []
        for i, d in enumerate(DOCS):
            path = os.path.join(cls.tmp, f"doc{i}.txt")
            with open(path, "w") as f:
                f.write(d)
            cls.doc_files.append(path)
        cls.grpc_cli = shutil.which("grpc_cli")

    @classmethod
    def tearDownClass(cls):
        for p in reversed(cls.procs):
            p.terminate()
            p.wait(timeout=10)
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def apectl_answer(self):
        r = run([f"{BIN}/apectl", "generate", f"--decoder={self.dec}", f"--prefix={PREFIX}",
                 "--context-file=" + ",".join(self.doc_files), f"--query={QUERY}", "--max-tokens=16"])
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


if __name__ == "__main__":
    unittest.main(verbosity=2)
