#!/usr/bin/python3
"""ape.v1.Cache end to end, every answer checked against what Redis itself
says (redis-cli / RESP): Stat (sizes, TTL, idle time, header fields,
verify), Delete, Touch, List (filters, cursors), Totals, on both servers,
through grpc_cli (reflection), the Python stubs and `apectl cache`; the same
on a 3-master Redis Cluster (List and Totals across masters). Also `apectl
encode` of a folder: plain progress lines when stderr is not a terminal, a
progress bar when it is."""
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import time
import unittest

import grpc

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "clients", "python"))
from apeserve_client import load_cache_stubs, load_stubs, make_channel, utf8  # noqa: E402
from apeserve_launcher import LocalServices, default_bin_dir, test_data_dir  # noqa: E402

BIN = default_bin_dir()
DATA = test_data_dir()
PREFIX_A, PREFIX_B = "Once upon a time", "One sunny morning"
DOCS = [" Lily had a big red ball.", " Tom had a dog. The dog liked to run.", " Sue saw a cat in the tree.",
        " Ben ate an apple.", " Mia liked to sing songs."]


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


class Common:
    """What the single-node and the cluster suites share."""

    def encode(self, prefix, docs, ttl=0, dtype=0):
        req = self.enc_pb.EncodeRequest(prefix=self.enc_pb.Segment(text=utf8(prefix)),
                                        contexts=[self.enc_pb.Segment(text=utf8(d)) for d in docs], ttl_seconds=ttl,
                                        dtype=dtype)
        with make_channel(self.s.encoder) as ch:
            return self.enc_grpc.EncoderStub(ch).Encode(req, timeout=60)

    def cache(self, addr=None):
        return self.cache_grpc.CacheStub(self._channels.setdefault(addr or self.s.decoder,
                                                                   make_channel(addr or self.s.decoder)))

    def redis(self, key, *args):
        """A command on the Redis (or cluster master) that holds `key`."""
        from apeserve_launcher import redis_command
        if not self.s.cluster:
            return self.s.redis_command(*args)
        for port in self.s.cluster.ports:
            try:
                return redis_command(port, *args)
            except Exception as e:  # noqa: BLE001: MOVED from the wrong master
                if "MOVED" not in str(e):
                    raise
        raise AssertionError(f"no master took {args}")

    def redis_keys(self):
        if not self.s.cluster:
            return {k.decode() for k in self.s.redis_command("KEYS", "*")}
        return set().union(*(self.s.cluster.keys_on(i, "*") for i in range(len(self.s.cluster.ports))))

    def list_all(self, limit, **filters):
        keys, cursor, calls = [], "", 0
        while True:
            r = self.cache().List(self.cache_pb.ListRequest(cursor=cursor, limit=limit, **filters), timeout=30)
            keys += [e.key for e in r.entries]
            calls += 1
            cursor = r.next_cursor
            if not cursor:
                return keys, calls


class CacheAdminTest(Common, unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.t0 = time.monotonic()
        cls.s = LocalServices(BIN, f"{DATA}/stories260K.bin", f"{DATA}/tok512.bin",
                              tmp_prefix="apeserve-cache-").start()
        os.environ["APESERVE_PY_GEN"] = os.path.join(cls.s.tmp, "py")  # removed with the services
        cls.enc_pb, cls.enc_grpc, _, _ = load_stubs()
        cls.cache_pb, cls.cache_grpc = load_cache_stubs()
        cls._channels = {}
        self = cls()
        cls.a = self.encode(PREFIX_A, DOCS[:3])
        cls.a32 = self.encode(PREFIX_A, DOCS[3:4], dtype=cls.enc_pb.KV_DTYPE_FLOAT32)
        cls.b = self.encode(PREFIX_B, DOCS[3:5], ttl=300)
        with make_channel(cls.s.encoder) as ch:
            cls.fingerprint = cls.enc_grpc.EncoderStub(ch).ModelInfo(cls.enc_pb.ModelInfoRequest(), timeout=30).fingerprint
        cls.all_keys = ({c.key for r in (cls.a, cls.a32, cls.b) for c in r.contexts}
                        | {cls.a.prefix.key, cls.a32.prefix.key, cls.b.prefix.key})

    @classmethod
    def tearDownClass(cls):
        for ch in cls._channels.values():
            ch.close()
        cls.s.stop()
        print(f"cache_admin_test (single node): {time.monotonic() - cls.t0:.1f} s", file=sys.stderr)

    def stored_bytes(self, key):
        n = int(self.redis(key, "HLEN", key))
        return sum(int(self.redis(key, "HSTRLEN", key, str(i))) for i in range(n))

    def test_grpc_cli_reflection(self):
        cli = shutil.which("grpc_cli")
        self.assertIsNotNone(cli, "grpc_cli not found: run deploy/build-grpc-cli.sh")
        for addr in (self.s.encoder, self.s.decoder):
            r = run([cli, "ls", addr])
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertIn("ape.v1.Cache", r.stdout.split())
            r = run([cli, "ls", addr, "ape.v1.Cache", "-l"])
            for m in ("Stat", "Delete", "Touch", "List", "Totals"):
                self.assertIn(f"rpc {m}(", r.stdout)
        key = self.a.contexts[0].key
        r = run([cli, "call", self.s.encoder, "ape.v1.Cache.Stat", f'keys: "{key}"'])
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("state: ENTRY_OK", r.stdout)
        self.assertIn(f"stored_bytes: {self.stored_bytes(key)}", r.stdout)

    def test_stat_against_redis(self):
        keys = [c.key for c in self.a.contexts] + [self.a.prefix.key, self.b.contexts[0].key, self.a32.contexts[0].key]
        time.sleep(1.1)  # idle time ticks in seconds
        idle = {k: int(self.redis(k, "OBJECT", "IDLETIME", k)) for k in keys}
        r = self.cache().Stat(self.cache_pb.StatRequest(keys=keys), timeout=30)
        self.assertEqual([e.key for e in r.entries], keys)
        for e in r.entries:
            self.assertEqual(e.state, self.cache_pb.ENTRY_OK, e)
            self.assertEqual(e.stored_bytes, self.stored_bytes(e.key))
            self.assertEqual(e.chunks, int(self.redis(e.key, "HLEN", e.key)))
            self.assertTrue(e.header_verified)
            self.assertFalse(e.verified)  # not asked
            self.assertEqual(e.model_fingerprint, self.fingerprint)
            self.assertTrue(e.this_model)
            self.assertGreaterEqual(idle[e.key], 1)
            self.assertIn(e.idle_seconds, (idle[e.key], idle[e.key] + 1))
            ttl = int(self.redis(e.key, "TTL", e.key))
            self.assertTrue(abs(e.ttl_seconds - ttl) <= 1, (e.ttl_seconds, ttl))
        by_key = {e.key: e for e in r.entries}
        for c in self.a.contexts:
            e = by_key[c.key]
            self.assertEqual((e.num_tokens, e.first_position, e.stored_bytes), (c.num_tokens, c.first_position,
                                                                                c.stored_bytes))
            self.assertEqual(e.kind, self.cache_pb.ENTRY_KIND_CONTEXT)
            self.assertEqual(e.prefix_key, self.a.prefix.key)
            self.assertEqual(e.dtype, self.enc_pb.KV_DTYPE_FLOAT16)
            self.assertEqual(e.ttl_seconds, -1)
        self.assertEqual(by_key[self.a.prefix.key].kind, self.cache_pb.ENTRY_KIND_PREFIX)
        self.assertEqual(by_key[self.a32.contexts[0].key].dtype, self.enc_pb.KV_DTYPE_FLOAT32)
        self.assertTrue(290 <= by_key[self.b.contexts[0].key].ttl_seconds <= 300)
        # Stat read the headers: the idle time starts again.
        again = self.cache().Stat(self.cache_pb.StatRequest(keys=keys[:1]), timeout=30).entries[0]
        self.assertEqual(again.idle_seconds, 0)
        # verify: the whole entry and its key check out.
        r = self.cache().Stat(self.cache_pb.StatRequest(keys=keys, verify=True), timeout=30)
        self.assertTrue(all(e.verified for e in r.entries), r)

    def test_stat_damaged_and_foreign(self):
        good = self.a.contexts[1].key
        value = self.s.redis_command("HGET", good, "0")
        k_flip, k_junk, k_str, k_missing, k_copy = (f"ape:v1:kv:{c * 32}" for c in "abcde")
        flipped = value[:-40] + bytes([value[-40] ^ 1]) + value[-39:]  # a payload byte: checksum fails
        self.s.redis_command("HSET", k_flip, "0", flipped)
        self.s.redis_command("HSET", k_junk, "0", b"not a kv block")
        self.s.redis_command("SET", k_str, b"a string")
        self.s.redis_command("HSET", k_copy, "0", value)  # a valid entry under another key's name
        try:
            r = self.cache().Stat(self.cache_pb.StatRequest(keys=[k_flip, k_junk, k_str, k_missing, k_copy],
                                                            verify=True), timeout=30)
            flip, junk, string, missing, copy = r.entries
            self.assertEqual(flip.state, self.cache_pb.ENTRY_OK)  # the header is fine ...
            self.assertTrue(flip.header_verified)
            self.assertFalse(flip.verified)  # ... the checksum is not
            self.assertIn("checksum", flip.error)
            self.assertEqual(junk.state, self.cache_pb.ENTRY_NOT_KV)
            self.assertEqual(string.state, self.cache_pb.ENTRY_NOT_KV)
            self.assertEqual(missing.state, self.cache_pb.ENTRY_MISSING)
            self.assertEqual(copy.state, self.cache_pb.ENTRY_OK)
            self.assertFalse(copy.verified)
            self.assertIn("not the one its key", copy.error)
            # List shows them unfiltered, hides them with a model filter.
            keys, _ = self.list_all(100)
            self.assertTrue({k_flip, k_junk, k_str, k_copy} <= set(keys))
            keys, _ = self.list_all(100, model_fingerprint=self.fingerprint)
            self.assertNotIn(k_junk, keys)
        finally:
            self.s.redis_command("DEL", k_flip, k_junk, k_str, k_copy)

    def test_bad_requests(self):
        for req in (self.cache_pb.StatRequest(keys=["user:1"]), self.cache_pb.StatRequest(),
                    self.cache_pb.StatRequest(keys=[self.a.prefix.key] * 17, verify=True)):
            with self.assertRaises(grpc.RpcError) as cm:
                self.cache().Stat(req, timeout=30)
            self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        with self.assertRaises(grpc.RpcError) as cm:
            self.cache().Delete(self.cache_pb.DeleteRequest(keys=["ape:v1:kv:zz"]), timeout=30)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        with self.assertRaises(grpc.RpcError) as cm:
            self.cache().List(self.cache_pb.ListRequest(cursor="nonsense"), timeout=30)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)

    def test_list_filters_and_cursors(self):
        keys, _ = self.list_all(100)
        content = {k for k in self.redis_keys() if re.fullmatch(r"ape:v1:kv:[0-9a-f]{32}", k)}
        self.assertEqual(set(keys), content)
        self.assertEqual(len(keys), len(set(keys)))
        self.assertTrue(self.all_keys <= content)
        paged, calls = self.list_all(2)
        self.assertEqual(set(paged), content)
        self.assertGreater(calls, 1)
        by_b, _ = self.list_all(100, prefix_key=self.b.prefix.key)
        self.assertEqual(set(by_b), {c.key for c in self.b.contexts} | {self.b.prefix.key})
        none, _ = self.list_all(100, model_fingerprint="0" * 32)
        self.assertEqual(none, [])
        r = self.cache().Totals(self.cache_pb.TotalsRequest(), timeout=30)
        self.assertEqual(r.entries, len(content))
        self.assertEqual(r.bytes, sum(self.stored_bytes(k) for k in content))
        mine = [m for m in r.models if m.model_fingerprint == self.fingerprint][0]
        self.assertTrue(mine.this_model)

    def test_touch_and_delete(self):
        r = self.encode(PREFIX_A, [" A doc to touch and delete.", " Another one."])
        k1, k2 = (c.key for c in r.contexts)
        gone = "ape:v1:kv:" + "f" * 32
        t = self.cache(self.s.encoder).Touch(self.cache_pb.TouchRequest(keys=[k1, gone], ttl_seconds=100), timeout=30)
        self.assertEqual((t.touched, list(t.missing)), (1, [gone]))
        self.assertTrue(95 <= int(self.s.redis_command("TTL", k1)) <= 100)
        t = self.cache().Touch(self.cache_pb.TouchRequest(keys=[k1], ttl_seconds=0), timeout=30)
        self.assertEqual(t.touched, 1)
        self.assertEqual(int(self.s.redis_command("TTL", k1)), -1)
        d = self.cache().Delete(self.cache_pb.DeleteRequest(keys=[k1, gone]), timeout=30)
        self.assertEqual((d.deleted, list(d.missing)), (1, [gone]))
        self.assertEqual(int(self.s.redis_command("EXISTS", k1)), 0)
        self.assertEqual(int(self.s.redis_command("EXISTS", k2)), 1)
        # apectl cache: ls, stat, touch, rm (against the encoder this time).
        k8 = self.encode(PREFIX_A, [" A doc kept as int8."], dtype=self.enc_pb.KV_DTYPE_INT8).contexts[0].key
        flags = [f"--cache-server={self.s.encoder}"]
        ls = run([f"{BIN}/apectl", "cache", "ls"] + flags)
        self.assertEqual(ls.returncode, 0, ls.stderr)
        lines = {line.split("\t")[0]: line.split("\t") for line in ls.stdout.splitlines()}
        content = {k for k in self.redis_keys() if re.fullmatch(r"ape:v1:kv:[0-9a-f]{32}", k)}
        self.assertEqual(set(lines), content)
        # key state kind tokens bytes dtype ...
        self.assertEqual((lines[k2][5], lines[k8][5]), ("float16", "int8"))
        st = run([f"{BIN}/apectl", "cache", "stat", "--verify", k2] + flags)
        self.assertEqual(st.returncode, 0, st.stderr)
        self.assertIn("verified: true", st.stdout)
        self.assertIn(f"stored_bytes: {self.stored_bytes(k2)}", st.stdout)
        tc = run([f"{BIN}/apectl", "cache", "touch", "--ttl-s=50", k2] + flags)
        self.assertEqual(tc.stdout.strip(), "touched 1", tc.stderr)
        self.assertTrue(45 <= int(self.s.redis_command("TTL", k2)) <= 50)
        rm = run([f"{BIN}/apectl", "cache", "rm", k2] + flags)
        self.assertEqual(rm.stdout.strip(), "deleted 1", rm.stderr)
        self.assertEqual(int(self.s.redis_command("EXISTS", k2)), 0)
        st = run([f"{BIN}/apectl", "cache", "stat", k2] + flags)
        self.assertEqual(st.returncode, 1)  # missing
        self.assertIn("ENTRY_MISSING", st.stdout)
        # One log line per Cache request, with its timing.
        for server in ("encoder", "decoder"):
            self.assertRegex(self.s.log(server), rf"{server} Cache\.\w+ OK .*total_ms=")
        self.assertRegex(self.s.log("decoder"), r"decoder Cache\.Delete OK keys=2 deleted=1")

    def test_apectl_encode_folder_progress(self):
        folder = os.path.join(self.s.tmp, "folder")
        os.makedirs(folder, exist_ok=True)
        texts = [f" Story {i}: the little fox ran home." for i in range(4)]
        for i, t in enumerate(texts):
            with open(os.path.join(folder, f"doc{i}.txt"), "w") as f:
                f.write(t)
        # Not a terminal: one plain line per document, with its key and time.
        r = run([f"{BIN}/apectl", "encode", f"--encoder={self.s.encoder}", f"--prefix={PREFIX_A}", folder])
        self.assertEqual(r.returncode, 0, r.stderr)
        keys = [line.split("\t")[0] for line in r.stdout.splitlines()]
        self.assertEqual(keys, [c.key for c in self.encode(PREFIX_A, texts).contexts])
        lines = [line for line in r.stderr.splitlines() if line.startswith("encoded ")]
        self.assertEqual(len(lines), 4, r.stderr)
        for i, (line, key) in enumerate(zip(lines, keys)):
            self.assertRegex(line, rf"^encoded {i + 1}/4 {key} [0-9.]+ ms new .*doc{i}\.txt$")
        self.assertIn("4 documents (4 new, 0 cached)", r.stderr)
        self.assertNotIn("\r", r.stderr)
        # A terminal: a progress bar redrawn in place; the same keys on stdout.
        master, slave = pty.openpty()
        p = subprocess.Popen([f"{BIN}/apectl", "encode", f"--encoder={self.s.encoder}", f"--prefix={PREFIX_A}",
                              "--batch=2", folder], stdout=subprocess.PIPE, stderr=slave, text=True)
        os.close(slave)
        with p.stdout:
            out, tty = p.stdout.read(), b""
        while select.select([master], [], [], 5)[0]:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            tty += chunk
        p.wait(timeout=30)
        os.close(master)
        self.assertEqual(p.returncode, 0, tty)
        self.assertEqual([line.split("\t")[0] for line in out.splitlines()], keys)
        tty = tty.decode(errors="replace")
        self.assertIn("\r", tty)
        self.assertIn("[" + "#" * 30 + "] 4/4", tty)
        self.assertNotIn("encoded 1/4", tty)
        self.assertIn("4 documents (0 new, 4 cached)", tty)


class ClusterCacheAdminTest(Common, unittest.TestCase):
    """The same service on a 3-master Redis Cluster: List pages and Totals
    cover every master."""

    @classmethod
    def setUpClass(cls):
        cls.t0 = time.monotonic()
        cls.s = LocalServices(BIN, f"{DATA}/stories260K.bin", f"{DATA}/tok512.bin", redis_cluster=3,
                              tmp_prefix="apeserve-cache-cluster-").start()
        os.environ["APESERVE_PY_GEN"] = os.path.join(cls.s.tmp, "py")  # removed with the services
        cls.enc_pb, cls.enc_grpc, _, _ = load_stubs()
        cls.cache_pb, cls.cache_grpc = load_cache_stubs()
        cls._channels = {}
        cls.r = cls().encode(PREFIX_A, [f" Doc {i}: the cat sat on the mat." for i in range(24)])

    @classmethod
    def tearDownClass(cls):
        for ch in cls._channels.values():
            ch.close()
        cls.s.stop()
        print(f"cache_admin_test (cluster): {time.monotonic() - cls.t0:.1f} s", file=sys.stderr)

    def test_list_totals_stat_delete_on_every_master(self):
        sizes = [self.s.dbsize(i) for i in range(3)]
        self.assertTrue(all(n > 0 for n in sizes), sizes)
        keys, calls = self.list_all(4)
        self.assertEqual(sorted(keys), sorted(self.redis_keys()))
        self.assertGreater(calls, 3)
        t = self.cache().Totals(self.cache_pb.TotalsRequest(), timeout=30)
        self.assertEqual(t.entries, sum(sizes))
        st = self.cache().Stat(self.cache_pb.StatRequest(keys=keys, verify=False), timeout=30)
        for e in st.entries:
            self.assertEqual(e.state, self.cache_pb.ENTRY_OK)
            n = int(self.redis(e.key, "HLEN", e.key))
            self.assertEqual(e.stored_bytes, sum(int(self.redis(e.key, "HSTRLEN", e.key, str(i))) for i in range(n)))
        victims = [c.key for c in self.r.contexts[:6]]
        d = self.cache().Delete(self.cache_pb.DeleteRequest(keys=victims), timeout=30)
        self.assertEqual(d.deleted, 6)
        self.assertEqual(sum(self.s.dbsize(i) for i in range(3)), sum(sizes) - 6)
        tc = self.cache().Touch(self.cache_pb.TouchRequest(keys=[c.key for c in self.r.contexts[6:]], ttl_seconds=77),
                                timeout=30)
        self.assertEqual(tc.touched, 18)
        for c in self.r.contexts[6:]:
            self.assertTrue(70 <= int(self.redis(c.key, "TTL", c.key)) <= 77)


if __name__ == "__main__":
    unittest.main(verbosity=2)
