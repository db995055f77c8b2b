#!/usr/bin/python3
"""Transport security and Redis credentials end to end, against real
processes on free loopback ports.

TLS: a throwaway CA, a server certificate (SAN localhost, 127.0.0.1) and a
client certificate are made at test time with Debian's `openssl`. The encoder
serves mutual TLS (--tls_client_ca), the decoder plain TLS and reaches the
encoder over mutual TLS (--encoder_tls_ca, --encoder_tls_cert/key). Checked:
apectl, the Python client, the gRPC health service (and reflection, with
grpc_cli) work over TLS with the CA; a plaintext client is refused; the
encoder refuses a client without a certificate and serves one with it; a
context sent as text is encoded through the decoder's TLS channel; bad TLS
files stop a server at start-up with a message naming the flag.

Redis: a redis-server with a password (given on stdin, never in argv); the
servers take it from --redis_password_file and $APESERVE_REDIS_PASSWORD
(file > environment > URI); the password is in no server's log or argv.
"""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import unittest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "clients", "python"))
import grpc  # noqa: E402
from apeserve_client import channel_credentials, load_stubs, make_channel, utf8  # noqa: E402
from apeserve_launcher import LocalServices, default_bin_dir, free_ports, test_data_dir, wait_for_port  # noqa: E402

BIN = default_bin_dir()  # $APE_BIN_DIR, else build/bin
DATA = test_data_dir()  # $APE_TEST_DATA, else tests/data
MODEL = [f"--model={DATA}/stories260K.bin", f"--tokenizer={DATA}/tok512.bin"]
PREFIX = "Once upon a time"
DOCS = [" there was a girl named Lily. She had a big red ball.", " Tom had a dog. The dog liked to run in the park."]
QUERY = " One day, Lily"
HEALTH_SERVING = b"\x08\x01"  # grpc.health.v1.HealthCheckResponse{status: SERVING}


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


def make_pki(d):
    """A CA, a server certificate for localhost/127.0.0.1 and a client
    certificate, all signed by the CA; a second, unrelated CA. Returns paths."""
    def openssl(*args):
        r = subprocess.run(["openssl", *args], capture_output=True, text=True, cwd=d)
        if r.returncode != 0:
            raise RuntimeError(f"openssl {' '.join(args)}: {r.stderr}")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for ca in ("ca", "other-ca"):
        openssl("req", "-x509", *ec, "-keyout", f"{ca}.key", "-out", f"{ca}.crt", "-days", "2",
                "-subj", f"/CN=apeserve test {ca}", "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    exts = {"server": "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
            "client": "extendedKeyUsage=clientAuth\n"}
    for name, ext in exts.items():
        with open(os.path.join(d, f"{name}.ext"), "w") as f:
            f.write("basicConstraints=CA:FALSE\n" + ext)
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN=apeserve test {name}")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext")
    return {n: os.path.join(d, n) for n in ("ca.crt", "other-ca.crt", "server.crt", "server.key", "client.crt",
                                           "client.key")}


def health(address, credentials=None, timeout=10):
    """Raw grpc.health.v1.Health/Check with an empty request (no stubs needed)."""
    with make_channel(address, credentials) as ch:
        return ch.unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=timeout)


class TlsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.pki_dir = tempfile.mkdtemp(prefix="apeserve-tls-pki-")
        cls.pki = p = make_pki(cls.pki_dir)
        cls.services = LocalServices(
            BIN, f"{DATA}/stories260K.bin", f"{DATA}/tok512.bin", tmp_prefix="apeserve-tls-",
            encoder_args=[f"--tls_cert={p['server.crt']}", f"--tls_key={p['server.key']}",
                          f"--tls_client_ca={p['ca.crt']}"],
            decoder_args=[f"--tls_cert={p['server.crt']}", f"--tls_key={p['server.key']}",
                          f"--encoder_tls_ca={p['ca.crt']}", f"--encoder_tls_cert={p['client.crt']}",
                          f"--encoder_tls_key={p['client.key']}"]).start()
        cls.enc, cls.dec, cls.tmp = cls.services.encoder, cls.services.decoder, cls.services.tmp
        cls.doc_files = []
        for i, d in enumerate(DOCS):
            path = os.path.join(cls.tmp, f"doc{i}.txt")
            with open(path, "w") as f:
                f.write(d)
            cls.doc_files.append(path)
        cls.env = dict(os.environ, APESERVE_PY_GEN=os.path.join(cls.tmp, "py"))
        os.environ["APESERVE_PY_GEN"] = cls.env["APESERVE_PY_GEN"]
        cls.enc_pb, cls.enc_grpc, cls.dec_pb, cls.dec_grpc = load_stubs()
        cls.ca_only = channel_credentials(tls_ca=p["ca.crt"])
        cls.with_client_cert = channel_credentials(tls_ca=p["ca.crt"], tls_cert=p["client.crt"],
                                                   tls_key=p["client.key"])

    @classmethod
    def tearDownClass(cls):
        cls.services.stop()
        shutil.rmtree(cls.pki_dir, ignore_errors=True)

    def apectl(self, *args):
        return run([f"{BIN}/apectl", *args])

    def tls_flags(self, client_cert=False):
        flags = [f"--tls-ca={self.pki['ca.crt']}"]
        if client_cert:
            flags += [f"--tls-cert={self.pki['client.crt']}", f"--tls-key={self.pki['client.key']}"]
        return flags

    def generate_by_text(self, credentials, docs):
        """Generate with `docs` sent as text (the decoder encodes misses
        through --encoder); returns the streamed text and the final message."""
        req = self.dec_pb.GenerateRequest(prefix=utf8(PREFIX), contexts=[self.dec_pb.ContextRef(text=utf8(d))
                                                                         for d in docs],
                                          query=utf8(QUERY), max_tokens=16)
        with make_channel(self.dec, credentials) as ch:
            msgs = list(self.dec_grpc.DecoderStub(ch).Generate(req, timeout=120))
        return "".join(m.token.text for m in msgs if m.HasField("token")), msgs[-1].final

    def test_servers_log_tls_at_startup(self):
        with open(self.services.logs["encoder"]) as f:
            enc_log = f.read()
        with open(self.services.logs["decoder"]) as f:
            dec_log = f.read()
        self.assertIn("mutual TLS", enc_log)
        self.assertNotIn("plaintext", enc_log)
        self.assertIn("listening on", dec_log)
        self.assertIn("encoder channel: TLS", dec_log)
        self.assertNotIn("plaintext", dec_log)

    def test_apectl_over_tls(self):
        r = self.apectl("generate", f"--decoder={self.dec}", f"--prefix={PREFIX}",
                        "--context-file=" + ",".join(self.doc_files), f"--query={QUERY}", "--max-tokens=16",
                        *self.tls_flags())
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertTrue(r.stdout.strip())
        r = self.apectl("encode", f"--encoder={self.enc}", f"--prefix={PREFIX}", *self.doc_files,
                        *self.tls_flags(client_cert=True))
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout.count("ape:v1:kv:"), 2, r.stdout)

    def test_python_client_over_tls(self):
        r = run(["/usr/bin/python3", f"{ROOT}/clients/python/apeserve_client.py", f"--encoder={self.enc}",
                 f"--decoder={self.dec}", f"--prefix={PREFIX}", "--doc", self.doc_files[0], "--doc",
                 self.doc_files[1], f"--query={QUERY}", "--max-tokens=16", *self.tls_flags(client_cert=True)],
                env=self.env)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("finish=length", r.stderr)
        apectl = self.apectl("generate", f"--decoder={self.dec}", f"--prefix={PREFIX}",
                             "--context-file=" + ",".join(self.doc_files), f"--query={QUERY}", "--max-tokens=16",
                             *self.tls_flags())
        self.assertEqual(r.stdout.rstrip("\n"), apectl.stdout.rstrip("\n"))

    def test_node_client_over_tls(self):
        if not shutil.which("node") or not os.path.isdir(f"{ROOT}/clients/node/node_modules"):
            self.skipTest("node or clients/node/node_modules missing")
        base = ["node", f"{ROOT}/clients/node/client.js", "--encoder", self.enc, "--decoder", self.dec, "--prefix",
                PREFIX, "--doc", self.doc_files[0], "--query", QUERY, "--max-tokens", "8"]
        r = run(base + ["--tls-ca", self.pki["ca.crt"], "--tls-cert", self.pki["client.crt"], "--tls-key",
                        self.pki["client.key"]])
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("finish=length", r.stderr)
        r = run(base)  # plaintext
        self.assertNotEqual(r.returncode, 0)

    def test_health_over_tls(self):
        for addr, creds in ((self.dec, self.ca_only), (self.enc, self.with_client_cert)):
            self.assertEqual(health(addr, creds), HEALTH_SERVING, addr)
        r = self.apectl("health", self.dec, *self.tls_flags())
        self.assertEqual((r.returncode, r.stdout.strip()), (0, "SERVING"), r.stderr)
        r = self.apectl("health", self.enc, *self.tls_flags(client_cert=True))
        self.assertEqual((r.returncode, r.stdout.strip()), (0, "SERVING"), r.stderr)
        r = self.apectl("health", self.dec)  # plaintext to a TLS port
        self.assertNotEqual(r.returncode, 0)
        # The name checked in the certificate can differ from the address
        # (the k8s probes dial 127.0.0.1 and check the Service's name).
        port = self.dec.rsplit(":", 1)[1]
        r = self.apectl("health", f"localhost:{port}", *self.tls_flags())
        self.assertEqual(r.returncode, 0, r.stderr)
        r = self.apectl("health", self.dec, "--tls-server-name=localhost", *self.tls_flags())
        self.assertEqual(r.returncode, 0, r.stderr)
        r = self.apectl("health", self.dec, "--tls-server-name=not-in-the-certificate", "--timeout-s=5",
                        *self.tls_flags())
        self.assertNotEqual(r.returncode, 0)
        r = self.apectl("health", self.dec, f"--tls-cert={self.pki['client.crt']}")  # half a pair
        self.assertEqual(r.returncode, 2)
        self.assertIn("--tls-cert and --tls-key go together", r.stderr)

    def test_reflection_over_tls(self):
        grpc_cli = shutil.which("grpc_cli")
        if not grpc_cli:
            self.skipTest("grpc_cli not found: run deploy/build-grpc-cli.sh")
        r = run([grpc_cli, "ls", self.dec, "-l", "--channel_creds_type=ssl"],
                env=dict(os.environ, GRPC_DEFAULT_SSL_ROOTS_FILE_PATH=self.pki["ca.crt"]))
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("rpc Generate(", r.stdout)

    def test_plaintext_client_refused(self):
        for addr in (self.enc, self.dec):
            with self.assertRaises(grpc.RpcError) as e:
                health(addr, None, timeout=5)
            self.assertEqual(e.exception.code(), grpc.StatusCode.UNAVAILABLE, addr)
        r = self.apectl("generate", f"--decoder={self.dec}", f"--query={QUERY}", "--max-tokens=4", "--timeout-s=5")
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("UNAVAILABLE", r.stderr)

    def test_wrong_ca_refused(self):
        with self.assertRaises(grpc.RpcError) as e:
            health(self.dec, channel_credentials(tls_ca=self.pki["other-ca.crt"]), timeout=5)
        self.assertEqual(e.exception.code(), grpc.StatusCode.UNAVAILABLE)

    def test_mutual_tls_needs_client_certificate(self):
        with self.assertRaises(grpc.RpcError) as e:
            health(self.enc, self.ca_only, timeout=5)
        self.assertEqual(e.exception.code(), grpc.StatusCode.UNAVAILABLE)
        r = self.apectl("model-info", f"--encoder={self.enc}", "--timeout-s=5", *self.tls_flags())
        self.assertNotEqual(r.returncode, 0)
        r = self.apectl("model-info", f"--encoder={self.enc}", *self.tls_flags(client_cert=True))
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("fingerprint", r.stdout)

    def encoder_log_count(self, what):
        with open(self.services.logs["encoder"]) as f:
            return f.read().count(what)

    def already_cached(self, docs):
        """Encode `docs` on the encoder (mutual TLS): were they cached before?"""
        with make_channel(self.enc, self.with_client_cert) as ch:
            resp = self.enc_grpc.EncoderStub(ch).Encode(self.enc_pb.EncodeRequest(
                prefix=self.enc_pb.Segment(text=utf8(PREFIX)),
                contexts=[self.enc_pb.Segment(text=utf8(d)) for d in docs]), timeout=60)
        return [c.already_cached for c in resp.contexts]

    def test_decoder_encodes_misses_through_tls_channel(self):
        docs = [" Sam found a shell by the sea.", " The shell was blue."]
        before = self.encoder_log_count("encoder Encode OK")
        text, final = self.generate_by_text(self.ca_only, docs)
        self.assertTrue(text)
        self.assertGreater(final.usage.encoded_tokens, 0)
        self.assertGreater(self.encoder_log_count("encoder Encode OK"), before)  # the misses went to the encoder
        self.assertEqual(self.already_cached(docs), [True, True])  # ... which stored them

    def test_decoder_without_client_certificate_cannot_use_encoder(self):
        # A decoder with no client certificate: the encoder refuses its
        # channel, so the decoder answers from an in-memory encoding that is
        # never stored.
        docs = [" A context nobody encoded yet."]
        p = self.pki
        with ExtraServer("ape-decoder", [f"--encoder={self.enc}", f"--redis={self.services.redis_uri}",
                                         f"--encoder_tls_ca={p['ca.crt']}", *MODEL]) as d:
            req = self.dec_pb.GenerateRequest(prefix=utf8(PREFIX), contexts=[self.dec_pb.ContextRef(text=utf8(t))
                                                                             for t in docs],
                                              query=utf8(QUERY), max_tokens=4)
            with make_channel(d.address) as ch:
                msgs = list(self.dec_grpc.DecoderStub(ch).Generate(req, timeout=60))
            self.assertGreater(msgs[-1].final.usage.encoded_tokens, 0)
        self.assertEqual(self.already_cached(docs), [False])

    def test_bad_tls_files_refuse_to_start(self):
        p, missing = self.pki, os.path.join(self.pki_dir, "missing.pem")
        cases = [
            ("ape-encoder", [f"--tls_cert={missing}", f"--tls_key={p['server.key']}"], "--tls_cert=" + missing),
            ("ape-encoder", [f"--tls_cert={p['server.crt']}"], "--tls_cert needs --tls_key"),
            ("ape-encoder", [f"--tls_cert={p['server.crt']}", f"--tls_key={p['client.key']}"], "is not the key"),
            ("ape-encoder", [f"--tls_cert={p['server.key']}", f"--tls_key={p['server.key']}"], "no PEM certificate"),
            ("ape-decoder", [f"--tls_client_ca={p['ca.crt']}"], "--tls_client_ca needs --tls_cert"),
            ("ape-decoder", [f"--encoder=127.0.0.1:1", f"--encoder_tls_ca={missing}"], "--encoder_tls_ca="),
            ("ape-decoder", [f"--encoder=127.0.0.1:1", f"--encoder_tls_cert={p['client.crt']}",
                             f"--encoder_tls_key={p['server.key']}"], "is not the key"),
        ]
        for binary, flags, message in cases:
            r = run([f"{BIN}/{binary}", "--listen=127.0.0.1:0", "--redis=redis://127.0.0.1:1", *MODEL, *flags])
            self.assertEqual(r.returncode, 1, (binary, flags, r.stderr))
            self.assertIn(message, r.stderr, flags)
            self.assertNotIn("listening", r.stderr)

    def test_plaintext_warns(self):
        with open(os.path.join(self.tmp, "plain.log"), "w+") as log:
            with ExtraServer("ape-encoder", [f"--redis={self.services.redis_uri}", *MODEL], log=log):
                pass
            log.seek(0)
            self.assertIn("warning: gRPC traffic on", log.read())


class ExtraServer:
    """One more ape-encoder/ape-decoder on a free port (a context manager)."""

    def __init__(self, binary, args, log=None, env=None):
        self.port = free_ports(1)[0]
        self.address = f"127.0.0.1:{self.port}"
        self.cmd = [f"{BIN}/{binary}", f"--listen={self.address}", *args]
        self.log, self.env, self.proc = log, env, None

    def __enter__(self):
        self.proc = subprocess.Popen(self.cmd, stdout=self.log or subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT if self.log else subprocess.DEVNULL,
                                     stdin=subprocess.DEVNULL, env=self.env)
        wait_for_port(self.port, self.proc, self.cmd[0])
        return self

    def __exit__(self, *exc):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return False


class RedisPasswordTest(unittest.TestCase):
    PASSWORD = "t0p-s3cret-" + os.urandom(6).hex()

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="apeserve-redis-auth-")
        cls.port = free_ports(1)[0]
        # The password reaches redis-server on stdin (config "-"), never in its argv.
        cls.redis = subprocess.Popen(["redis-server", "-", "--port", str(cls.port), "--bind", "127.0.0.1",
                                      "--save", "", "--dir", cls.tmp], stdin=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cls.redis.stdin.write(f"requirepass {cls.PASSWORD}\n".encode())
        cls.redis.stdin.close()
        wait_for_port(cls.port, cls.redis, "redis-server")
        cls.password_file = os.path.join(cls.tmp, "redis-password")
        with open(cls.password_file, "w") as f:
            f.write(cls.PASSWORD + "\n")  # the trailing newline is stripped
        os.environ.setdefault("APESERVE_PY_GEN", os.path.join(cls.tmp, "py"))
        cls.enc_pb, cls.enc_grpc, cls.dec_pb, cls.dec_grpc = load_stubs()

    @classmethod
    def tearDownClass(cls):
        cls.redis.kill()
        cls.redis.wait()
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def uri(self, password=None):
        return f"redis://{':' + password + '@' if password else ''}127.0.0.1:{self.port}"

    def env(self, **extra):
        env = {k: v for k, v in os.environ.items() if not k.startswith("APESERVE_REDIS_")}
        env.update(extra)
        return env

    def test_password_from_file_and_env_never_shown(self):
        with open(os.path.join(self.tmp, "encoder.log"), "w+") as enc_log, \
             open(os.path.join(self.tmp, "decoder.log"), "w+") as dec_log:
            self.check_password_from_file_and_env(enc_log, dec_log)

    def check_password_from_file_and_env(self, enc_log, dec_log):
        # The encoder: --redis_password_file beats a wrong $APESERVE_REDIS_PASSWORD
        # and a wrong URI password. The decoder: the environment beats the URI.
        with ExtraServer("ape-encoder", [f"--redis={self.uri('wrong-uri-password')}",
                                         f"--redis_password_file={self.password_file}", *MODEL], log=enc_log,
                         env=self.env(APESERVE_REDIS_PASSWORD="wrong-env-password")) as enc, \
             ExtraServer("ape-decoder", [f"--redis={self.uri('wrong-uri-password')}", f"--encoder={enc.address}",
                                         *MODEL], log=dec_log,
                         env=self.env(APESERVE_REDIS_PASSWORD=self.PASSWORD)) as dec:
            with make_channel(enc.address) as ch:
                resp = self.enc_grpc.EncoderStub(ch).Encode(self.enc_pb.EncodeRequest(
                    prefix=self.enc_pb.Segment(text=utf8(PREFIX)),
                    contexts=[self.enc_pb.Segment(text=utf8(d)) for d in DOCS]), timeout=60)
            self.assertTrue(all(not c.already_cached for c in resp.contexts))
            req = self.dec_pb.GenerateRequest(prefix=utf8(PREFIX), contexts=[self.dec_pb.ContextRef(key=utf8(c.key))
                                                                             for c in resp.contexts],
                                              query=utf8(QUERY), max_tokens=8)
            with make_channel(dec.address) as ch:
                msgs = list(self.dec_grpc.DecoderStub(ch).Generate(req, timeout=60))
            usage = msgs[-1].final.usage
            self.assertEqual(usage.encoded_tokens, 0)  # every context read from the password-protected Redis
            self.assertGreaterEqual(usage.cached_tokens, sum(c.num_tokens for c in resp.contexts))
            for proc in (enc.proc, dec.proc):
                with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
                    self.assertNotIn(self.PASSWORD.encode(), f.read())
            ps = run(["ps", "-eo", "args"]).stdout
            self.assertNotIn(self.PASSWORD, ps)
        for log, source in ((enc_log, "--redis_password_file"), (dec_log, "$APESERVE_REDIS_PASSWORD")):
            log.seek(0)
            text = log.read()
            self.assertIn(f"password from {source}", text)
            self.assertIn("warning: the --redis URI holds a password", text)
            for secret in (self.PASSWORD, "wrong-uri-password", "wrong-env-password"):
                self.assertNotIn(secret, text)

    def test_wrong_password_fails_without_echoing_it(self):
        with open(os.path.join(self.tmp, "wrong.log"), "w+") as log:
            with ExtraServer("ape-encoder", [f"--redis={self.uri('not-the-password')}", *MODEL], log=log,
                             env=self.env()) as enc:
                with make_channel(enc.address) as ch, self.assertRaises(grpc.RpcError) as e:
                    self.enc_grpc.EncoderStub(ch).Encode(self.enc_pb.EncodeRequest(
                        contexts=[self.enc_pb.Segment(text=utf8(DOCS[0]))]), timeout=30)
                self.assertEqual(e.exception.code(), grpc.StatusCode.PERMISSION_DENIED, e.exception.details())
                self.assertNotIn("not-the-password", e.exception.details())
            log.seek(0)
            text = log.read()
        self.assertIn("WRONGPASS", text)
        self.assertNotIn("not-the-password", text)

    def test_bad_password_file_or_uri_refuses_to_start_without_echoing(self):
        empty = os.path.join(self.tmp, "empty")
        with open(empty, "w") as f:
            f.write("\n")
        cases = [([f"--redis={self.uri()}", f"--redis_password_file={empty}"], "no password"),
                 ([f"--redis={self.uri()}", f"--redis_password_file={self.tmp}/missing"], "--redis_password_file="),
                 (["--redis=redis://user:uri-secret@127.0.0.1:notaport"], "bad port"),
                 (["--redis=rediss://user:uri-secret@127.0.0.1"], "rediss://***@127.0.0.1")]
        for flags, message in cases:
            r = run([f"{BIN}/ape-encoder", "--listen=127.0.0.1:0", *MODEL, *flags], env=self.env())
            self.assertEqual(r.returncode, 1, (flags, r.stderr))
            self.assertIn(message, r.stderr)
            self.assertNotIn("uri-secret", r.stderr)


if __name__ == "__main__":
    unittest.main(verbosity=2)
