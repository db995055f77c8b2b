#!/usr/bin/python3
"""The fault suite (issue 11): real redis-server, ape-encoder and ape-decoder
on free loopback ports, disturbed while they serve: Redis killed mid-stream
and restarted empty, paused (SIGSTOP), evicting under maxmemory, restarted
under a warm decoder; the encoder killed during encode-on-miss; clients that
cancel or give 1 ms deadlines; forged and copied cache entries written
straight into Redis.

The rule every check applies: a request ends with the RIGHT answer (greedy,
equal to the answer the same request gets from a healthy system, computed in
setUpClass) or with a CLEAR status (UNAVAILABLE, NOT_FOUND,
RESOURCE_EXHAUSTED, FAILED_PRECONDITION, CANCELLED, DEADLINE_EXCEEDED,
INVALID_ARGUMENT; each check narrows the list), never UNKNOWN or INTERNAL,
never a wrong answer with OK, never a hang (every call has a deadline); the
servers stay up; and the next correct request after the fault is right.

Model: models/apeserve-qa.gguf over deploy/local/docs (questions from
deploy/local/questions.tsv), so a wrong answer is visible as another
document's fact. Binaries from $APE_BIN_DIR (default <repo>/build/bin).

  APE_BIN_DIR=build/bin /usr/bin/python3 tests/e2e/fault_test.py [-v] [FaultTest.test_07_forged_and_copied_entries]

A summary of every check (observed status or answer) is printed at the end.
"""
import concurrent.futures
import os
import sys
import threading
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "clients", "python"))
sys.path.insert(0, HERE)
import grpc  # noqa: E402
from apeserve_client import load_stubs  # noqa: E402
from apeserve_launcher import LocalServices, default_bin_dir  # noqa: E402
import kv_forge  # noqa: E402

BIN = default_bin_dir()
MODEL = os.path.join(ROOT, "models", "apeserve-qa.gguf")
DOCS_DIR = os.path.join(ROOT, "deploy", "local", "docs")
PREFIX = "You answer questions about the documents below ."
MAX_TOKENS = 12  # an answer restates a fact (3 tokens), then " ." stops it
STOP = " ."
SERVER_ARGS = ["--threads=1", "--redis_timeout_ms=1000"]  # deterministic and quick to notice a dead Redis

enc_pb, enc_grpc, dec_pb, dec_grpc = load_stubs()
SC = grpc.StatusCode
CLEAR = {SC.UNAVAILABLE, SC.NOT_FOUND, SC.RESOURCE_EXHAUSTED, SC.FAILED_PRECONDITION, SC.CANCELLED,
         SC.DEADLINE_EXCEEDED, SC.INVALID_ARGUMENT}
APE, SEQ = dec_pb.MODE_APE, dec_pb.MODE_SEQUENTIAL


def utf8(s):
    return s if isinstance(s, bytes) else s.encode("utf-8")  # the API's text fields may be string or bytes


def text_of(v):
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else v


def read_docs():
    docs = {}
    for name in sorted(os.listdir(DOCS_DIR)):
        with open(os.path.join(DOCS_DIR, name), encoding="utf-8") as f:
            docs[name] = f.read().rstrip("\r\n")
    return docs


def read_questions():
    qs = []
    with open(os.path.join(ROOT, "deploy", "local", "questions.tsv"), encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if line and not line.startswith("#"):
                q, value, doc = line.split("\t")
                qs.append((q, value, doc))
    return qs


DOCS = read_docs()  # "doc1.txt" -> text
NAMES = sorted(DOCS)
QUESTIONS = read_questions()  # [(question, expected value, document)]


def rotate(text, k):
    """The document's sentences rotated by k: the same facts as new content
    (a new cache key), for encode-on-miss."""
    parts = [p.strip() for p in text.split(" .") if p.strip()]
    k %= len(parts)
    return " . ".join(parts[k:] + parts[:k]) + " ."


# Requests, as (context texts, question index, mode): each is sent by key or
# by text; its right answer is the healthy system's.
ALL = tuple(DOCS[n] for n in NAMES)
ONE = {n: (DOCS[n],) for n in NAMES}
NEW_A = tuple(rotate(DOCS[n], 1) for n in NAMES[:3])  # encode-on-miss contexts, never pre-encoded
NEW_B = tuple(rotate(DOCS[n], 2) for n in NAMES[3:])
NEW_C = tuple(rotate(DOCS[n], 1) for n in NAMES[3:])
BIG = tuple(" ".join(rotate(DOCS[n], k + i) for i, n in enumerate(NAMES)) for k in range(3, 19))  # 16 x ~108 tokens
WARM = [(rotate(DOCS[a], 1) + " " + rotate(DOCS[b], 1),)  # one context each, for warm-ups
        for a, b in (("doc1.txt", "doc2.txt"), ("doc3.txt", "doc4.txt"))]
EVICT = [tuple(rotate(DOCS[n], k) for n in NAMES[i:i + 2]) for k, i in ((1, 0), (2, 2), (3, 4), (2, 0), (3, 2))]


def sig(texts, qi, mode=APE):
    return (tuple(texts), qi, mode)


BASELINE_SIGS = ([sig(ALL, qi) for qi in range(len(QUESTIONS))] + [sig(ALL, 0, SEQ)]
                 + [sig(ONE[n], qi) for qi, (_, _, n) in enumerate(QUESTIONS)] + [sig(ONE["doc1.txt"], 0, SEQ)]
                 + [sig(NEW_A, 0), sig(NEW_B, 3), sig(NEW_C, 4), sig(BIG, 1)] + [sig(t, 2) for t in EVICT]
                 + [sig(t, 0) for t in WARM])
BASE = {}  # sig -> the healthy system's answer text
KEYS = {}  # context text -> its cache key (content keys are the same on every system)
PREFIX_KEY = None
REPORT = []  # (check, observed, verdict)


class Outcome:
    def __init__(self, code, text="", final=None, message="", elapsed=0.0, tokens=0):
        self.code, self.text, self.final, self.message, self.elapsed, self.tokens = \
            code, text, final, message, elapsed, tokens

    @property
    def ok(self):
        return self.code == SC.OK

    def __repr__(self):
        if self.ok:
            return f"OK {self.text!r}"
        return f"{self.code.name} ({self.message[:160]})"


def generate(stub, req, timeout, cancel_after=None):
    """Runs one Generate to its end: the streamed text and final message, or
    the status. cancel_after=n cancels the call after n tokens."""
    t0 = time.monotonic()
    call = stub.Generate(req, timeout=timeout)
    parts, final, n = [], None, 0
    try:
        for msg in call:
            if msg.HasField("token"):
                n += 1
                parts.append(text_of(msg.token.text))
                if cancel_after is not None and n >= cancel_after:
                    call.cancel()
            else:
                final = msg.final
    except grpc.RpcError as e:
        return Outcome(e.code(), "".join(parts), None, text_of(e.details() or ""), time.monotonic() - t0, n)
    if final is None:  # a stream must end with its final message
        return Outcome(SC.UNKNOWN, "".join(parts), None, "stream ended without a final message",
                       time.monotonic() - t0, n)
    return Outcome(SC.OK, text_of(final.text), final, "", time.monotonic() - t0, n)


def request(s, by="key", max_tokens=MAX_TOKENS, stop=(STOP,)):
    texts, qi, mode = s
    if by == "key":
        refs = [dec_pb.ContextRef(key=utf8(KEYS[t])) for t in texts]
    else:
        refs = [dec_pb.ContextRef(text=utf8(t)) for t in texts]
    query = f"question : {QUESTIONS[qi][0]} answer :"
    return dec_pb.GenerateRequest(prefix=utf8(PREFIX), contexts=refs, query=utf8(query), mode=mode,
                                  max_tokens=max_tokens, stop=[utf8(x) for x in stop])


def encode(enc, texts, timeout=30):
    r = enc.Encode(enc_pb.EncodeRequest(prefix=enc_pb.Segment(text=utf8(PREFIX)),
                                        contexts=[enc_pb.Segment(text=utf8(t)) for t in texts]), timeout=timeout)
    return r


def try_encode(enc, texts, timeout):
    """(status code, message, response or None) of one Encode."""
    try:
        return SC.OK, "", encode(enc, texts, timeout=timeout)
    except grpc.RpcError as e:
        return e.code(), text_of(e.details() or ""), None


def cpu_ticks(pid):
    """User + system CPU time of a process, in clock ticks (/proc/pid/stat)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return 0


class Services:
    """LocalServices with the suite's flags, plus gRPC stubs."""

    def __init__(self, decoder_args=(), encoder_args=(), redis_args=()):
        self.local = LocalServices(BIN, MODEL, encoder_args=SERVER_ARGS + list(encoder_args),
                                   decoder_args=SERVER_ARGS + list(decoder_args), redis_args=redis_args,
                                   tmp_prefix="apeserve-fault-").start()
        self.channels = [grpc.insecure_channel(self.local.encoder), grpc.insecure_channel(self.local.decoder)]
        self.enc = enc_grpc.EncoderStub(self.channels[0])
        self.dec = dec_grpc.DecoderStub(self.channels[1])

    def stop(self):
        for ch in self.channels:
            ch.close()
        self.local.stop()

    def redis(self, *args):
        return self.local.redis_command(*args)


class FaultTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        """The healthy system's answers and keys, before any fault."""
        global PREFIX_KEY
        t0 = time.monotonic()
        svc = Services()
        try:
            texts = sorted({t for s in BASELINE_SIGS for t in s[0]})
            r = encode(svc.enc, texts, timeout=60)
            PREFIX_KEY = text_of(r.prefix.key)
            for t, c in zip(texts, r.contexts):
                KEYS[t] = text_of(c.key)
            for s in BASELINE_SIGS:
                o = generate(svc.dec, request(s, "text"), timeout=30)
                assert o.ok, f"healthy system failed {s[1:]}: {o}"
                BASE[s] = o.text
            # Content keys make by key and by text the same request.
            for s in (sig(ALL, 0), sig(ALL, 0, SEQ), sig(ONE["doc1.txt"], 0)):
                o = generate(svc.dec, request(s, "key"), timeout=30)
                assert o.ok and o.text == BASE[s], f"healthy system: by key {o} != by text {BASE[s]!r}"
            # kv_forge reads what the encoder writes, and computes its keys.
            fp = bytes.fromhex(text_of(svc.enc.ModelInfo(enc_pb.ModelInfoRequest(), timeout=10).fingerprint))
            raw = svc.redis("HGET", KEYS[DOCS["doc1.txt"]], "0")
            b = kv_forge.Block.parse(raw)
            pre = kv_forge.Block.parse(svc.redis("HGET", PREFIX_KEY, "0"))
            assert kv_forge.kv_key(fp, b.dtype, b.kind, pre.tokens, b.tokens) == KEYS[DOCS["doc1.txt"]]
            assert kv_forge.kv_key(fp, pre.dtype, pre.kind, pre.tokens) == PREFIX_KEY
            assert b.seal() == raw, "kv_forge does not reproduce a stored entry byte for byte"
        finally:
            svc.stop()
        print(f"\n[baseline] {len(BASE)} answers of the healthy system in {time.monotonic() - t0:.1f} s, "
              f"e.g. Q1 over all documents: {BASE[sig(ALL, 0)]!r}", file=sys.stderr)

    def setUp(self):
        self.t_start = time.monotonic()

    def tearDown(self):
        print(f"[{self._testMethodName}] {time.monotonic() - self.t_start:.1f} s", file=sys.stderr)

    # ---- helpers ---------------------------------------------------------------

    def start(self, **kw):
        svc = Services(**kw)
        self.addCleanup(svc.stop)
        return svc

    def record(self, check, observed, ok):
        verdict = "pass" if ok is True else "FAIL" if ok is False else ok  # or "info"
        REPORT.append((f"{self._testMethodName[5:]}: {check}", observed, verdict))

    def check(self, what, o, s, allowed=CLEAR, timeout=None, need_key_in_message=None, quiet=False):
        """o is the right answer for s, or a status in `allowed` (each a
        clear status), within the deadline (+1 s for scheduling). quiet:
        reported only when it fails (for long series, summarised apart)."""
        problems = []
        if o.ok:
            if o.text != BASE[s]:
                problems.append(f"WRONG answer {o.text!r}, the healthy system answers {BASE[s]!r}")
        elif o.code not in allowed or o.code not in CLEAR:
            problems.append(f"status {o.code.name} is not one of {sorted(c.name for c in allowed & CLEAR)}: "
                            f"{o.message[:300]}")
        elif need_key_in_message and o.code == SC.NOT_FOUND:
            missing = [k for k in need_key_in_message if k not in o.message]
            if missing:
                problems.append(f"NOT_FOUND does not name {missing}: {o.message[:300]}")
        if timeout is not None and o.elapsed > timeout + 1.0:
            problems.append(f"took {o.elapsed:.2f} s with a {timeout} s deadline")
        if problems or not quiet:
            self.record(what, repr(o), not problems)
        with self.subTest(what):
            self.assertFalse(problems, f"{what}: " + "; ".join(problems))
        return not problems

    def right(self, what, o, s, timeout=None, quiet=False):
        """o must be the right answer (OK)."""
        return self.check(what, o, s, allowed=set(), timeout=timeout, quiet=quiet)

    def expect(self, what, cond, observed):
        self.record(what, observed, bool(cond))
        with self.subTest(what):
            self.assertTrue(cond, f"{what}: {observed}")
        return bool(cond)

    def alive(self, svc, what, names=("decoder", "encoder")):
        for n in names:
            up = svc.local.alive(n)
            self.expect(f"{what}: {n} alive", up, "alive" if up else
                        f"exited with {svc.local.returncode(n)}:\n{svc.local.log_tail(n)}")

    def next_right(self, svc, what, by=("key", "text"), s=None):
        """The next correct request is right (and the decoder alive)."""
        s = s or sig(ALL, 0)
        for b in by:
            self.right(f"{what}: next request by {b} right", generate(svc.dec, request(s, b), timeout=10), s, 10)
        self.alive(svc, what, ("decoder",))

    def encode_all(self, svc, texts=ALL):
        r = encode(svc.enc, texts)
        got = [text_of(c.key) for c in r.contexts]
        self.assertEqual(got, [KEYS[t] for t in texts], "content keys differ from the healthy system's")
        return r

    def raw_entry(self, svc, key):
        return svc.redis("HGETALL", key)  # [field, value, ...]

    def put_raw(self, svc, key, flat_fields):
        svc.redis("DEL", key)
        svc.redis("HSET", key, *flat_fields)

    # ---- 1. Redis killed mid-stream, restarted empty ---------------------------

    def test_01_redis_killed_mid_stream_then_restarted_empty(self):
        svc = self.start()
        self.encode_all(svc)
        phase, results, stop = ["before"], [], threading.Event()

        def stream():
            i = 0
            while not stop.is_set():
                s, by = sig(ALL, i % len(QUESTIONS)), ("key", "text")[i % 2]
                p0 = phase[0]
                o = generate(svc.dec, request(s, by), timeout=5)
                results.append((p0, phase[0], by, s, o))
                i += 1

        th = threading.Thread(target=stream, daemon=True)
        th.start()

        def wait_for(n, phase_name, limit=15):
            end = time.monotonic() + limit
            while time.monotonic() < end and sum(1 for r in results if r[0] == phase_name) < n:
                time.sleep(0.01)

        wait_for(6, "before")
        phase[0] = "down"
        svc.local.kill("redis")  # SIGKILL, in the middle of the stream
        wait_for(6, "down")
        stop.set()
        th.join(20)
        self.assertFalse(th.is_alive(), "request stream hung")
        seen = {}
        for i, (p0, p1, by, s, o) in enumerate(results):
            where = p0 if p0 == p1 else "in flight at the kill"
            seen.setdefault(f"{where} by {by}", []).append(o.code.name)
            if p0 == p1 == "before":
                self.right(f"before the kill, request {i} by {by}", o, s, 5, quiet=True)
            else:  # Redis gone: by key cannot be served, by text is encoded locally (right) or UNAVAILABLE
                self.check(f"{where}, request {i} by {by}", o, s, {SC.UNAVAILABLE}, 5, quiet=True)
        self.record("stream of requests across the kill (each right, or UNAVAILABLE)", "; ".join(
            f"{k}: {', '.join(f'{c} x{v.count(c)}' for c in sorted(set(v)))}" for k, v in seen.items()), "info")
        self.expect("Redis down: requests by key get UNAVAILABLE",
                    any(r[0] == r[1] == "down" and r[2] == "key" and r[4].code == SC.UNAVAILABLE for r in results),
                    [repr(r[4]) for r in results if r[0] == "down" and r[2] == "key"][:2])
        self.alive(svc, "Redis down")

        svc.local.restart("redis")  # empty
        s = sig(ALL, 0)
        # By key: NOT_FOUND naming every key. A stale pooled connection may
        # first give UNAVAILABLE (issue 11 #6, checked by test_04): tolerated
        # before the first NOT_FOUND, and counted.
        stale = []
        for _ in range(6):
            o = generate(svc.dec, request(s, "key"), timeout=5)
            if o.code != SC.UNAVAILABLE:
                break
            stale.append(o)
        self.check("restarted empty: by key gives NOT_FOUND naming the keys", o, s, {SC.NOT_FOUND}, 5,
                   need_key_in_message=[KEYS[t] for t in ALL])
        self.expect("restarted empty: by key is NOT_FOUND (the entries are gone)", o.code == SC.NOT_FOUND, repr(o))
        self.expect("restarted empty: no UNAVAILABLE from stale connections before NOT_FOUND", not stale,
                    f"{len(stale)} x UNAVAILABLE first: {stale[:1]}")
        # By text: encode on miss, right, and stored again (by key works after).
        o = generate(svc.dec, request(s, "text"), timeout=10)
        self.right("restarted empty: by text right (encode on miss)", o, s, 10)
        self.expect("restarted empty: by text encoded the contexts", o.ok and o.final.usage.encoded_tokens > 0,
                    repr(o.final.usage).replace("\n", " ") if o.ok else repr(o))
        for attempt in range(1, 4):
            o = generate(svc.dec, request(s, "key"), timeout=10)
            if o.ok:
                break
            generate(svc.dec, request(s, "text"), timeout=10)
        self.right(f"restarted empty: by key right after re-encoding (attempt {attempt})", o, s, 10)
        self.alive(svc, "after the restart")

    # ---- 2. Redis paused -------------------------------------------------------

    def test_02_redis_paused_then_resumed(self):
        svc = self.start()
        self.encode_all(svc)
        s = sig(ALL, 0)
        self.right("warm", generate(svc.dec, request(s, "key"), timeout=10), s)
        svc.local.pause("redis")
        try:
            wait = {SC.UNAVAILABLE, SC.DEADLINE_EXCEEDED}
            self.check("paused: by key (3 s deadline)", generate(svc.dec, request(s, "key"), timeout=3), s, wait, 3)
            s1 = sig(ALL, 1)
            self.check("paused: by text (3 s deadline)", generate(svc.dec, request(s1, "text"), timeout=3), s1,
                       wait, 3)
            self.check("paused: by key (0.5 s deadline)", generate(svc.dec, request(s, "key"), timeout=0.5), s,
                       wait, 0.5)
            t0 = time.monotonic()
            code, msg, _ = try_encode(svc.enc, ALL[:2], timeout=3)
            ok = code in wait and time.monotonic() - t0 < 4
            self.expect("paused: encoder Encode ends UNAVAILABLE/DEADLINE_EXCEEDED in time", ok,
                        f"{code.name} after {time.monotonic() - t0:.2f} s {msg[:160]}")
            self.alive(svc, "paused")
        finally:
            svc.local.resume("redis")
        self.next_right(svc, "resumed")
        for qi in (1, 2):
            self.right(f"resumed: question {qi + 1} by key", generate(svc.dec, request(sig(ALL, qi), "key"), 10),
                       sig(ALL, qi))
        code, msg, r = try_encode(svc.enc, ALL[:2], timeout=5)
        self.expect("resumed: Encode finds the entries", code == SC.OK and all(c.already_cached for c in r.contexts),
                    f"{code.name} {msg[:160]}")

    # ---- 3. Redis evicting under maxmemory --------------------------------------

    def test_03_redis_evicting_under_maxmemory(self):
        svc = self.start()

        def info(section, field):
            for line in svc.redis("INFO", section).decode().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split(":")[1])
            raise KeyError(field)

        used0 = info("memory", "used_memory")
        self.encode_all(svc)
        # Room for about 3 of the 7 entries (~20 KB each): every request evicts others.
        svc.redis("CONFIG", "SET", "maxmemory-policy", "allkeys-lru")
        svc.redis("CONFIG", "SET", "maxmemory", used0 + 64 * 1024)
        plan = []
        for i in range(20):
            plan.append((sig(ALL, i % len(QUESTIONS)), "key"))
            plan.append((sig(EVICT[i % len(EVICT)], 2), "text"))  # new content: encoded, stored, evicting
            if i % 2:
                plan.append((sig(ALL, i % len(QUESTIONS)), "text"))
        wrong, codes = 0, {}
        for i, (s, by) in enumerate(plan):
            o = generate(svc.dec, request(s, by), timeout=10)
            codes[o.code.name] = codes.get(o.code.name, 0) + 1
            allowed = {SC.NOT_FOUND} if by == "key" else {SC.RESOURCE_EXHAUSTED}
            if not self.check(f"evicting: request {i} by {by}", o, s, allowed, 10, quiet=True):
                wrong += 1
        evicted = info("stats", "evicted_keys")
        self.expect("evicting: Redis evicted entries while requests ran", evicted > 0, f"evicted_keys={evicted}")
        self.expect("evicting: every answer right (by text), or NOT_FOUND (by key)", wrong == 0,
                    f"{len(plan)} requests: {codes}, {wrong} not right/clear")
        self.alive(svc, "evicting")
        svc.redis("CONFIG", "SET", "maxmemory", 0)
        s = sig(ALL, 0)
        self.right("memory back: by text right", generate(svc.dec, request(s, "text"), timeout=10), s)
        self.right("memory back: by key right (re-stored)", generate(svc.dec, request(s, "key"), timeout=10), s)

    # ---- 4. Redis restarted under a warm decoder ----------------------------------

    def test_04_redis_restarted_under_warm_decoder(self):
        """Issue 11 #6: a warm decoder's pooled connections are stale after a
        Redis restart; the first request must still succeed (retry once on a
        fresh connection)."""
        svc = self.start(decoder_args=["--max_concurrent=4"], encoder_args=["--max_concurrent=2"])
        self.encode_all(svc)
        s = sig(ALL, 0)
        with concurrent.futures.ThreadPoolExecutor(8) as ex:  # several pooled connections
            warm = list(ex.map(lambda i: generate(svc.dec, request(sig(ALL, i % 8), "key"), 10), range(16)))
            list(ex.map(lambda i: encode(svc.enc, ALL[i % 3:i % 3 + 3]), range(4)))
        self.expect("warm: 16 concurrent requests right",
                    all(o.ok and o.text == BASE[sig(ALL, i % 8)] for i, o in enumerate(warm)),
                    [repr(o) for o in warm[:3]])
        keys = [PREFIX_KEY] + [KEYS[t] for t in ALL]
        saved = {k: self.raw_entry(svc, k) for k in keys}
        svc.local.kill("redis")
        svc.local.restart("redis")
        for k, fields in saved.items():  # the same entries, on a new Redis process
            self.put_raw(svc, k, fields)
        seq = [generate(svc.dec, request(s, "key"), timeout=5) for _ in range(5)]
        self.right("restart: the FIRST request by key after the restart right", seq[0], s, 5)
        self.expect("restart: 5 requests in a row right", all(o.ok and o.text == BASE[s] for o in seq),
                    ", ".join(o.code.name for o in seq) + (f"; first: {seq[0]}" if not seq[0].ok else ""))
        code, msg, r = try_encode(svc.enc, ALL, timeout=5)
        self.expect("restart: the FIRST Encode after the restart finds the entries",
                    code == SC.OK and all(c.already_cached for c in r.contexts), f"{code.name} {msg[:160]}")
        o = generate(svc.dec, request(sig(ALL, 1), "text"), timeout=5)
        self.right("restart: by text right", o, sig(ALL, 1), 5)
        want = sum(len(kv_forge.Block.parse(saved[KEYS[t]][1]).tokens) for t in ALL)
        self.expect("restart: by text read the cache (cached_tokens = all context tokens)",
                    o.ok and o.final.usage.cached_tokens >= want,
                    f"cached_tokens={o.final.usage.cached_tokens if o.ok else None}, want >= {want}")
        self.alive(svc, "restart")

    # ---- 5. The encoder killed during encode-on-miss ------------------------------

    def encoder_reachable(self, svc, what, s, limit=10.0):
        """Sends request s (by text, its contexts not stored yet) until the
        decoder reaches the encoder (an Encode line in its log): after a
        restart its channel reconnects with backoff. Each answer must be right."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < limit:
            before = svc.local.log("encoder").count(" Encode ")
            self.right(f"{what}: warm-up request right", generate(svc.dec, request(s, "text"), timeout=10), s, 10,
                       quiet=True)
            if svc.local.log("encoder").count(" Encode ") > before:
                self.record(f"{what}: the decoder reached the encoder", f"after {time.monotonic() - t0:.1f} s", "info")
                return True
            time.sleep(0.2)
        return self.expect(f"{what}: the decoder reaches the encoder within {limit:.0f} s", False, "never")

    def test_05_encoder_killed_during_encode_on_miss(self):
        svc = self.start()
        ex = concurrent.futures.ThreadPoolExecutor(2)
        self.addCleanup(ex.shutdown)
        # a. The encoder SIGKILLed while it computes a large encode-on-miss
        # (16 contexts, ~1,700 tokens, ~150 ms of encoding).
        s = sig(BIG, 1)
        busy0 = cpu_ticks(svc.local.pid("encoder"))
        fut = ex.submit(generate, svc.dec, request(s, "text"), 20)
        t0 = time.monotonic()  # kill once the encoder has computed for 10 ms (or the request ended)
        while time.monotonic() - t0 < 5 and cpu_ticks(svc.local.pid("encoder")) < busy0 + 1 and not fut.done():
            time.sleep(0.002)
        computing = not fut.done()
        svc.local.kill("encoder")
        o = fut.result(25)
        self.record("encoder killed mid-encode: the request was in flight at the kill", computing, "info")
        self.check("encoder killed mid-encode of 16 contexts: right (local fallback) or UNAVAILABLE", o, s,
                   {SC.UNAVAILABLE}, 20)
        self.alive(svc, "encoder killed mid-encode", ("decoder",))
        # b. The encoder frozen (SIGSTOP) with the decoder waiting for it, then SIGKILLed.
        svc.local.restart("encoder")
        self.encoder_reachable(svc, "encoder restarted", sig(WARM[0], 0))
        s = sig(NEW_A, 0)
        svc.local.pause("encoder")
        fut = ex.submit(generate, svc.dec, request(s, "text"), 15)
        time.sleep(0.5)
        in_flight = not fut.done()
        svc.local.kill("encoder")
        o = fut.result(20)
        self.expect("encoder frozen: the request waited for it (in flight at the kill)", in_flight, repr(o))
        self.check("encoder killed in flight: right (local fallback) or UNAVAILABLE", o, s, {SC.UNAVAILABLE}, 15)
        self.alive(svc, "encoder killed in flight", ("decoder",))
        s = sig(NEW_B, 3)
        self.right("encoder dead: the next request with new text right (local fallback)",
                   generate(svc.dec, request(s, "text"), timeout=10), s, 10)
        # c. Encoder back: right answers, and contexts stored through it again.
        svc.local.restart("encoder")
        self.encoder_reachable(svc, "encoder restarted again", sig(WARM[1], 0))
        s = sig(NEW_C, 4)
        self.right("encoder back: new text right", generate(svc.dec, request(s, "text"), timeout=10), s, 10)
        self.right("encoder back: stored through it (by key right)", generate(svc.dec, request(s, "key"), timeout=10),
                   s, 10)
        self.alive(svc, "encoder back")

    # ---- 6. Client cancels and 1 ms deadlines ---------------------------------------

    def test_06_client_cancel_and_1ms_deadlines(self):
        svc = self.start(decoder_args=["--max_concurrent=1", "--max_queue=4"])
        self.encode_all(svc)
        s = sig(ALL, 0)
        # a. Cancel mid-stream (a long generation, cancelled after its first token).
        long_req = request(s, "key", max_tokens=150, stop=())
        o = generate(svc.dec, long_req, timeout=10, cancel_after=1)
        self.expect("cancel mid-stream: CANCELLED", o.code == SC.CANCELLED, f"{o!r} after {o.tokens} tokens")
        self.next_right(svc, "after the cancel", by=("key",))
        # b. 1 ms deadlines on 24 requests (by key, by new text, SEQUENTIAL), 8 at a time.
        kinds = [(sig(ALL, 1), "key"), (sig(NEW_A, 0), "text"), (sig(ALL, 0, SEQ), "key"), (sig(BIG, 1), "text")]
        with concurrent.futures.ThreadPoolExecutor(8) as ex:
            outs = list(ex.map(lambda i: (i, generate(svc.dec, request(*kinds[i % 4]), 0.001)), range(24)))
        bad = []
        for i, o in outs:
            s_i = kinds[i % 4][0]
            if not (o.code in (SC.DEADLINE_EXCEEDED, SC.CANCELLED) or (o.ok and o.text == BASE[s_i])) \
                    or o.elapsed > 1.0:
                bad.append(f"{i}: {o!r} in {o.elapsed:.2f} s")
        self.expect("1 ms deadlines: each DEADLINE_EXCEEDED/CANCELLED (or right), promptly", not bad,
                    bad or "24 x " + ",".join(sorted({o.code.name for _, o in outs})))
        # c. The next request right; then as many at once as the server admits
        # (1 computing + 4 queued): all right, so no admission slot leaked.
        self.right("1 ms deadlines: the next request right (immediately)",
                   generate(svc.dec, request(sig(ALL, 2), "key"), timeout=5), sig(ALL, 2), 5)
        with concurrent.futures.ThreadPoolExecutor(5) as ex:
            outs = list(ex.map(lambda i: generate(svc.dec, request(sig(ALL, i), "key"), 10), range(5)))
        self.expect("1 ms deadlines: 5 concurrent requests (the admission capacity) all right",
                    all(o.ok and o.text == BASE[sig(ALL, i)] for i, o in enumerate(outs)), [repr(o) for o in outs])
        # d. Requests expiring while queued free their queue slots at once
        # (issue 11 #6: up to 50 ms late). A by-key request holds the only
        # compute slot while Redis is paused; 4 requests with 225 ms deadlines
        # (not a multiple of a 50 ms poll) fill the queue and expire; 8 ms
        # later 4 more must be queued, not refused.
        with concurrent.futures.ThreadPoolExecutor(9) as ex:
            svc.local.pause("redis")
            try:
                blocker = ex.submit(generate, svc.dec, request(s, "key"), 5)
                time.sleep(0.15)
                expiring = [ex.submit(generate, svc.dec, request(sig(ALL, i), "key"), 0.225) for i in range(4)]
                exp = [f.result(5) for f in expiring]
                time.sleep(0.008)
                later = [ex.submit(generate, svc.dec, request(sig(ALL, i), "key"), 5) for i in range(4)]
                time.sleep(0.15)
            finally:
                svc.local.resume("redis")
            b, later = blocker.result(10), [f.result(10) for f in later]
        self.expect("queued and expired: DEADLINE_EXCEEDED", all(o.code == SC.DEADLINE_EXCEEDED for o in exp),
                    [repr(o) for o in exp])
        self.check("queued and expired: the request holding the slot (Redis paused ~0.4 s) right", b, s,
                   {SC.UNAVAILABLE}, 5)
        self.expect("queued and expired: their queue slots freed at once (4 new requests queued, all right)",
                    all(o.ok and o.text == BASE[sig(ALL, i)] for i, o in enumerate(later)), [repr(o) for o in later])
        self.next_right(svc, "after the deadlines")

    # ---- 7. Forged and copied entries -----------------------------------------------

    def forged_case(self, svc, name, key, value_writer, requests, restore, not_deleted=False):
        """Writes a forged value at `key`, sends each (label, sig, by,
        allowed) request, checks the servers stay up (and, not_deleted, that
        the decoder left the value as it was), restores and checks the next
        request."""
        value_writer()
        before = svc.redis("DUMP", key)
        for label, s, by, allowed in requests:
            o = generate(svc.dec, request(s, by), timeout=10)
            self.check(f"{name}: {label}", o, s, allowed, 10)
            self.alive(svc, f"{name}: {label}", ("decoder",))
            if not_deleted and by == "key":
                exists, now = svc.redis("EXISTS", key), svc.redis("DUMP", key)
                self.expect(f"{name}: after {label}, the value is still there, untouched (EXISTS={exists})",
                            exists == 1 and now == before, f"EXISTS={exists}, unchanged={now == before}")
            if not_deleted and by == "text":
                exists = svc.redis("EXISTS", key)
                self.expect(f"{name}: after {label}, the key still exists (EXISTS={exists})", exists == 1,
                            f"EXISTS={exists}, unchanged={svc.redis('DUMP', key) == before}")
        restore()
        self.next_right(svc, f"{name}: restored", by=("key",), s=requests[0][1])

    def test_07_forged_and_copied_entries(self):
        svc = self.start()
        self.encode_all(svc)
        d1, d2 = DOCS["doc1.txt"], DOCS["doc2.txt"]
        k1, k2 = KEYS[d1], KEYS[d2]
        q1 = sig(ONE["doc1.txt"], 0)  # "when did Pelzanos arrive ?" over doc1 alone
        q1seq = sig(ONE["doc1.txt"], 0, SEQ)
        refuse = {SC.FAILED_PRECONDITION, SC.NOT_FOUND}
        too_big = refuse | {SC.INVALID_ARGUMENT, SC.RESOURCE_EXHAUSTED}  # 300 tokens may exceed the window
        originals = {k: self.raw_entry(svc, k) for k in [PREFIX_KEY] + [KEYS[t] for t in ALL]}

        def restore_all():
            for k, fields in originals.items():
                self.put_raw(svc, k, fields)

        def write_block(key, block_bytes):
            return lambda: self.put_raw(svc, key, [b"0", block_bytes])

        # a. COPY doc2's entry over doc1's key: doc1 must not answer with doc2's facts.
        name = "COPY doc2 -> doc1"
        svc.redis("COPY", k2, k1, "REPLACE")
        for label, s, by in (("by key (APE)", q1, "key"), ("by key (SEQUENTIAL)", q1seq, "key"),
                             ("all six by key", sig(ALL, 0), "key")):
            o = generate(svc.dec, request(s, by), timeout=10)
            self.check(f"{name}: {label} refused, never doc2's facts", o, s, refuse, 10)
        o = generate(svc.dec, request(q1, "text"), timeout=10)
        self.right(f"{name}: by text right (a clean miss, re-encoded)", o, q1, 10)
        o = generate(svc.dec, request(q1, "key"), timeout=10)
        self.right(f"{name}: repaired by the request by text (then by key right)", o, q1, 10)
        self.alive(svc, name)
        restore_all()
        self.next_right(svc, f"{name}: restored", by=("key",), s=q1)

        # b. The prefix entry re-sealed claiming 300 tokens (checksum recomputed).
        pre = kv_forge.Block.parse(originals[PREFIX_KEY][1]).resize(300)
        forged = pre.seal()
        kv_forge.Block.parse(forged)  # well-formed: only its content lies
        self.forged_case(svc, "prefix entry claiming 300 tokens", PREFIX_KEY, write_block(PREFIX_KEY, forged), [
            ("by key", sig(ALL, 0), "key", too_big), ("by text", sig(ALL, 1), "text", set()),
            ("SEQUENTIAL by key", sig(ALL, 0, SEQ), "key", too_big), ("doc1 by key", q1, "key", too_big)],
            restore_all)

        # c. A context entry re-sealed claiming 300 tokens.
        ctx = kv_forge.Block.parse(originals[k1][1]).resize(300)
        self.forged_case(svc, "doc1 entry claiming 300 tokens", k1, write_block(k1, ctx.seal()), [
            ("by key", q1, "key", too_big), ("by text", q1, "text", set()),
            ("SEQUENTIAL by key", q1seq, "key", too_big)], restore_all)

        # d. A payload holding NaN (checksum recomputed): corrupt, never used.
        nan = kv_forge.with_nan(kv_forge.Block.parse(originals[k1][1]), count=8)
        self.forged_case(svc, "doc1 entry with NaN in its KV", k1, write_block(k1, nan.seal()), [
            ("by key", q1, "key", refuse), ("by text", q1, "text", set())], restore_all)

        # e. Values the decoder cannot read must not be deleted by it.
        d3, d4, d5 = (ONE[n] for n in ("doc3.txt", "doc4.txt", "doc5.txt"))
        k3, k4, k5 = (KEYS[t[0]] for t in (d3, d4, d5))
        s3, s4, s5 = sig(d3, 2), sig(d4, 3), sig(d5, 4)
        self.forged_case(svc, "a string (not a hash) at a content key", k3,
                         lambda: (svc.redis("DEL", k3), svc.redis("SET", k3, "somebody else's value")), [
                             ("by key", s3, "key", refuse), ("by text", s3, "text", set())],
                         restore_all, not_deleted=True)
        self.forged_case(svc, "a hash that is no KV block at a content key", k4,
                         lambda: self.put_raw(svc, k4, [b"0", b"not a KV block, somebody else's"]), [
                             ("by key", s4, "key", refuse), ("by text", s4, "text", set())],
                         restore_all, not_deleted=True)
        newer = kv_forge.Block.parse(originals[k5][1]).seal(version=2)
        self.forged_case(svc, "a newer-format (version 2) entry at a content key", k5, write_block(k5, newer), [
            ("by key", s5, "key", refuse), ("by text", s5, "text", set())], restore_all, not_deleted=True)
        self.alive(svc, "forged entries")


def tearDownModule():
    if not REPORT:
        return
    width = min(max(len(c) for c, _, _ in REPORT), 100)
    print("\n== fault checks (observed)", file=sys.stderr)
    for check, observed, verdict in REPORT:
        print(f"{verdict:4}  {check:{width}}  {str(observed)[:200]}", file=sys.stderr)
    fails = sum(1 for r in REPORT if r[2] == "FAIL")
    passes = sum(1 for r in REPORT if r[2] == "pass")
    print(f"== {passes} pass, {fails} FAIL", file=sys.stderr)


if __name__ == "__main__":
    unittest.main(verbosity=2)
