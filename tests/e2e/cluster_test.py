#!/usr/bin/python3
"""Redis Cluster end to end: a 3-master cluster on loopback, two encoders and
two decoders on --redis=redis+cluster://..., clients balancing round-robin
over both servers of each kind; next to them a single-node set-up (one Redis,
one encoder, one decoder) answering the same requests as the oracle.

  1. entries land on all three masters (redis-cli dbsize);
  2. greedy answers (token ids) equal the single node's, by key and by text,
     and both decoders and both encoders (also through the decoders'
     encode-on-miss, --encoder=ipv4:A,B) served requests;
  3. a slot migration (redis-cli --cluster reshard of 3000 slots) during a
     stream of Generate requests: every answer correct, none an error;
  4. one master killed: a request by key whose entry lived there is
     UNAVAILABLE naming the node, the same content by text is answered
     correctly (encoded in memory), keys on the other masters still work.
The tests run in this order (names sort so) and share the services."""
import os
import subprocess
import sys
import threading
import time
import unittest

import grpc

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "clients", "python"))
from apeserve_client import load_stubs, make_channel, utf8  # noqa: E402
from apeserve_launcher import LocalServices, default_bin_dir, test_data_dir  # noqa: E402

BIN = default_bin_dir()
DATA = test_data_dir()
PREFIX = "Once upon a time"
QUERY = " One day,"
NAMES = ["Lily", "Tom", "Sue", "Ben", "Mia", "Max"]
THINGS = ["ball", "dog", "cat", "car", "hat"]
# 30 documents: enough that every master holds some (P(one holds none) ~ 1e-5).
DOCS = [f" {n} had a big {t}. {n} liked to play with the {t} in the park every day."
        for n in NAMES for t in THINGS]
# Requests by document index: 2 or 3 contexts each.
REQUESTS = [(0, 1), (2, 3, 4), (5, 6), (7, 8, 9), (10, 11), (12, 13, 14), (15, 16), (17, 18, 19)]
MAX_TOKENS = 12


def count(log, what):
    return sum(1 for line in log.splitlines() if what in line)


class ClusterTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.t0 = time.monotonic()
        cls.single = LocalServices(BIN, f"{DATA}/stories260K.bin", f"{DATA}/tok512.bin",
                                   tmp_prefix="apeserve-single-").start()
        try:
            cls.cl = LocalServices(BIN, f"{DATA}/stories260K.bin", f"{DATA}/tok512.bin", encoders=2, decoders=2,
                                   redis_cluster=3, tmp_prefix="apeserve-cluster-").start()
        except BaseException:
            cls.single.stop()
            raise
        os.environ.setdefault("APESERVE_PY_GEN", os.path.join(cls.cl.tmp, "py"))
        cls.enc_pb, cls.enc_grpc, cls.dec_pb, cls.dec_grpc = load_stubs()
        # Clients: an address list, balanced round-robin (make_channel's default for a list).
        cls.enc_ch = make_channel(",".join(cls.cl.encoders))
        cls.dec_ch = make_channel(",".join(cls.cl.decoders))
        cls.single_enc = make_channel(cls.single.encoder)
        cls.single_dec = make_channel(cls.single.decoder)
        cls.keys = None
        cls.expected = {}  # request -> token ids on the single node

    @classmethod
    def tearDownClass(cls):
        for ch in ("enc_ch", "dec_ch", "single_enc", "single_dec"):
            if hasattr(cls, ch):
                getattr(cls, ch).close()
        cls.cl.stop()
        cls.single.stop()
        print(f"cluster_test: {time.monotonic() - cls.t0:.1f} s", file=sys.stderr)

    # ---- helpers -------------------------------------------------------------

    def encode_one(self, channel, doc):
        req = self.enc_pb.EncodeRequest(prefix=self.enc_pb.Segment(text=utf8(PREFIX)),
                                        contexts=[self.enc_pb.Segment(text=utf8(doc))])
        return self.enc_grpc.EncoderStub(channel).Encode(req, timeout=60)

    def generate(self, channel, refs, timeout=60):
        """Token ids of a greedy answer; refs: ContextRef list."""
        req = self.dec_pb.GenerateRequest(prefix=utf8(PREFIX), contexts=refs, query=utf8(QUERY),
                                          max_tokens=MAX_TOKENS)
        msgs = list(self.dec_grpc.DecoderStub(channel).Generate(req, timeout=timeout))
        self.assertTrue(msgs and msgs[-1].HasField("final"))
        return [m.token.id for m in msgs if m.HasField("token") and m.token.id >= 0]

    def by_key(self, docs):
        return [self.dec_pb.ContextRef(key=utf8(self.keys[i])) for i in docs]

    def by_text(self, docs):
        return [self.dec_pb.ContextRef(text=utf8(DOCS[i])) for i in docs]

    def ensure_encoded(self):
        if self.keys is not None:
            return
        cls = type(self)
        # One Encode per document over the two encoders, round-robin.
        cls.keys = [self.encode_one(self.enc_ch, d).contexts[0].key for d in DOCS]
        single_keys = [self.encode_one(self.single_enc, d).contexts[0].key for d in DOCS]
        self.assertEqual(cls.keys, single_keys)  # content-addressed: the same keys on both set-ups
        cls.prefix_key = self.encode_one(self.enc_ch, DOCS[0]).prefix.key
        for r in REQUESTS:
            cls.expected[r] = self.generate(self.single_dec, self.by_key(r))

    def master_of(self, key):
        for i in range(3):
            if key in self.cl.cluster.keys_on(i, "ape:v1:kv:*"):
                return i
        return None

    def slots_of(self, i):
        """Slots master i owns, from its own CLUSTER NODES line."""
        myself = [line for line in self.cl.cluster_cli(i, "cluster", "nodes").splitlines() if "myself" in line][0]
        owned = 0
        for part in myself.split()[8:]:
            lo, _, hi = part.partition("-")
            owned += int(hi or lo) - int(lo) + 1
        return owned

    # ---- tests ---------------------------------------------------------------

    def test_1_entries_on_every_master(self):
        self.ensure_encoded()
        sizes = [self.cl.dbsize(i) for i in range(3)]
        self.assertTrue(all(n > 0 for n in sizes), f"dbsize per master: {sizes}")
        self.assertEqual(sum(sizes), len(DOCS) + 1, f"dbsize per master: {sizes}")  # contexts + the prefix entry
        on = set().union(*(self.cl.cluster.keys_on(i, "*") for i in range(3)))
        self.assertEqual(on, set(self.keys) | {self.prefix_key})  # no temporary keys left
        for name in ("encoder", "encoder1"):  # round-robin reached both encoders
            self.assertGreater(count(self.cl.log(name), "Encode OK"), 0, name)

    def test_2_answers_equal_single_node(self):
        self.ensure_encoded()
        for r in REQUESTS:
            self.assertEqual(self.generate(self.dec_ch, self.by_key(r)), self.expected[r], f"by key {r}")
            self.assertEqual(self.generate(self.dec_ch, self.by_text(r)), self.expected[r], f"by text {r}")
        for name in ("decoder", "decoder1"):
            self.assertGreater(count(self.cl.log(name), "Generate OK"), 0, name)
        # Encode-on-miss through the decoders' --encoder list: new content by
        # text reaches both encoders.
        before = [count(self.cl.log(n), "Encode OK") for n in ("encoder", "encoder1")]
        for i in range(8):
            doc = f" A new story number {i}. The bird sang a song in the tree."
            single = self.generate(self.single_dec, [self.dec_pb.ContextRef(text=utf8(doc))])
            self.assertEqual(self.generate(self.dec_ch, [self.dec_pb.ContextRef(text=utf8(doc))]), single)
        after = [count(self.cl.log(n), "Encode OK") for n in ("encoder", "encoder1")]
        self.assertTrue(all(a > b for a, b in zip(after, before)), f"Encode calls before {before}, after {after}")
        # The command-line clients take the address list too (round-robin).
        r = REQUESTS[0]
        keys = ",".join(self.keys[i] for i in r)
        before = [count(self.cl.log(n), "Generate OK") for n in ("decoder", "decoder1")]
        for _ in range(4):
            p = subprocess.run([f"{BIN}/apectl", "generate", "--decoder=" + ",".join(self.cl.decoders),
                                f"--prefix={PREFIX}", f"--context-key={keys}", f"--query={QUERY}",
                                f"--max-tokens={MAX_TOKENS}", "--print-ids"], capture_output=True, text=True,
                               timeout=60)
            self.assertEqual(p.returncode, 0, p.stderr)
            self.assertEqual([int(x) for x in p.stdout.strip().split(",")], self.expected[r])
        docs = [os.path.join(self.cl.tmp, f"doc{i}.txt") for i in r]
        for path, i in zip(docs, r):
            with open(path, "w") as f:
                f.write(DOCS[i])
        p = subprocess.run(["/usr/bin/python3", f"{ROOT}/clients/python/apeserve_client.py",
                            "--encoder=" + ",".join(self.cl.encoders), "--decoder=" + ",".join(self.cl.decoders),
                            f"--prefix={PREFIX}", f"--query={QUERY}", f"--max-tokens={MAX_TOKENS}"]
                           + [a for d in docs for a in ("--doc", d)], capture_output=True, text=True, timeout=60)
        self.assertEqual(p.returncode, 0, p.stderr)
        calls = 5
        if os.path.isdir(f"{ROOT}/clients/node/node_modules"):
            p = subprocess.run(["node", f"{ROOT}/clients/node/client.js", "--encoder", ",".join(self.cl.encoders),
                                "--decoder", ",".join(self.cl.decoders), "--prefix", PREFIX, "--query", QUERY,
                                "--max-tokens", str(MAX_TOKENS)] + [a for d in docs for a in ("--doc", d)],
                               capture_output=True, text=True, timeout=60)
            self.assertEqual(p.returncode, 0, p.stderr)
            calls += 1
        after = [count(self.cl.log(n), "Generate OK") for n in ("decoder", "decoder1")]
        self.assertEqual(sum(after) - sum(before), calls)

    def test_3_reshard_during_generate(self):
        self.ensure_encoded()
        slots_before = self.slots_of(0)
        on0_before = self.cl.dbsize(0)
        result = {}

        def reshard():
            try:
                result["out"] = self.cl.reshard(0, 1, 3000)
            except Exception as e:  # noqa: BLE001: reported by the main thread
                result["error"] = e

        t = threading.Thread(target=reshard)
        t.start()
        done, errors, wrong = 0, [], []
        try:
            while t.is_alive() or done < 8:
                r = REQUESTS[done % len(REQUESTS)]
                refs = self.by_key(r) if done % 2 == 0 else self.by_text(r)
                try:
                    ids = self.generate(self.dec_ch, refs)
                    if ids != self.expected[r]:
                        wrong.append((r, ids))
                except grpc.RpcError as e:
                    errors.append(f"{r}: {e.code().name}: {e.details()}")
                done += 1
        finally:
            t.join()
        self.assertNotIn("error", result, result.get("error"))
        self.assertEqual(errors, [])
        self.assertEqual(wrong, [])
        # The slots did move: master 0 owns 3000 fewer slots.
        self.assertEqual(self.slots_of(0), slots_before - 3000)
        self.assertLessEqual(self.cl.dbsize(0), on0_before)
        self.assertEqual(sum(self.cl.dbsize(i) for i in range(3)), len(DOCS) + 1 + 8)  # + test_2's new documents
        print(f"reshard of 3000 slots: {done} Generate requests during it, all correct", file=sys.stderr)

    def test_4_master_down(self):
        self.ensure_encoded()
        where = {i: self.master_of(k) for i, k in enumerate(self.keys)}
        prefix_on = self.master_of(self.prefix_key)
        # Kill a master that does not hold the prefix entry (every by-key
        # request reads it) but holds some documents.
        victim = next(m for m in range(3) if m != prefix_on and any(w == m for w in where.values()))
        dead_docs = [i for i, w in where.items() if w == victim][:2]
        live_docs = [i for i, w in where.items() if w not in (victim, None)][:2]
        self.cl.kill(f"redis{victim}")
        dead = f"127.0.0.1:{self.cl.cluster.ports[victim]}"
        expected_dead = self.generate(self.single_dec, self.by_text(dead_docs))
        expected_live = self.generate(self.single_dec, self.by_text(live_docs))
        for _ in range(2):  # both decoders (round-robin)
            with self.assertRaises(grpc.RpcError) as cm:
                self.generate(self.dec_ch, self.by_key(dead_docs), timeout=30)
            self.assertEqual(cm.exception.code(), grpc.StatusCode.UNAVAILABLE, cm.exception.details())
            self.assertIn(dead, cm.exception.details())
            t0 = time.monotonic()
            self.assertEqual(self.generate(self.dec_ch, self.by_text(dead_docs), timeout=30), expected_dead)
            self.assertLess(time.monotonic() - t0, 15)
            self.assertEqual(self.generate(self.dec_ch, self.by_key(live_docs), timeout=30), expected_live)


if __name__ == "__main__":
    unittest.main(verbosity=2)
