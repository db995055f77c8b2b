#!/usr/bin/python3
"""Chat templates end to end, with Jinja as the oracle.

Two random-weight models are made at test time (make_chat_model.py) with
real tokenizers and chat templates: a qwen2-shaped one with Qwen3's
vocabulary and template (ChatML, no BOS) and a llama-shaped one with
Llama 3's (BOS, header markers, trimmed messages). Each is served by a
private redis-server, ape-encoder and ape-decoder (apeserve_launcher), and:

(a) the token ids the decoder reads for a chat request (Final.prompt_ids:
    prefix + documents + query, contexts by key, by content, encoded on a
    miss through the encoder) equal the ids of Jinja's rendering of the
    model's own template for [system: prefix, user: documents + query] with
    add_generation_prompt, tokenized with special tokens parsed
    (`apectl tokenize --parse-special` on the vocabulary file); also with no
    system text, with no documents, and for Qwen2's template, which writes a
    default system text;
(b) with one document, PARALLEL (APE at T = S = 1, float32 cache entries)
    gives the same greedy ids as SEQUENTIAL, which gives the ids of
    `apectl run --prompt-ids <Jinja ids>` (the engine in process, no server);
(c) a model without a template, and one with a template of no known family,
    refuse chat with FAILED_PRECONDITION naming the problem, on both servers;
(d) the Qwen model (add_bos false) serves plain (chat false) requests
    without BOS, and refuses an empty plain prefix with INVALID_ARGUMENT;
and apectl, the Python and the Node.js clients pass --chat through.

Needs Debian's python3-jinja2 and python3-numpy (deploy/install-deps.sh).
"""
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

import grpc
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "clients", "python"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from apeserve_client import encode, generate, load_stubs, make_channel, utf8  # noqa: E402
from apeserve_launcher import LocalServices, default_bin_dir, test_data_dir  # noqa: E402
from make_chat_model import make_chat_model, read_gguf  # noqa: E402

BIN = default_bin_dir()  # $APE_BIN_DIR, else build/bin
DATA = test_data_dir()  # $APE_TEST_DATA, else tests/data
FAMILIES = os.path.join(DATA, "families")
TMP = tempfile.mkdtemp(prefix="apeserve-chat-")
os.environ.setdefault("APESERVE_PY_GEN", os.path.join(TMP, "py"))

PREFIX = "You answer questions about the documents."
# Each ends with a newline and starts with a letter: documents are tokenized
# one by one, and these boundaries are where the pre-tokenizers split the
# whole rendering too, so the Jinja ids and the server's can be equal.
DOCS = ["Ann keeps a green lamp in the attic.\n", "Bob rides a red bicycle to the lake.\n",
        "Cid paints blue boats near the harbour.\n"]
QUERY = "What does Ann keep?"
# Qwen2-7B-Instruct's template: a default system text when there is none.
QWEN2_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ "
                  "'<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + "
                  "message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if "
                  "add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


def render(vocab_kv, template, system, user):
    """The template rendered as transformers' apply_chat_template does."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])

    def raise_exception(message):
        raise RuntimeError(message)
    env.globals["raise_exception"] = raise_exception
    tokens = vocab_kv["tokenizer.ggml.tokens"][1]
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return env.from_string(template).render(messages=messages, add_generation_prompt=True,
                                            bos_token=tokens[vocab_kv["tokenizer.ggml.bos_token_id"][1]],
                                            eos_token=tokens[vocab_kv["tokenizer.ggml.eos_token_id"][1]])


def tokenize(vocab, text, parse_special):
    r = run([f"{BIN}/apectl", "tokenize", f"--model={vocab}"] + (["--parse-special"] if parse_special else [])
            + ["--", text])
    if r.returncode != 0:
        raise RuntimeError(r.stderr)
    return [int(t) for t in r.stdout.split()]


class Served:
    """A generated model (or a given one) behind private services."""

    def __init__(self, name, fixture=None, vocab=None, template=None, model=None):
        self.generated = model is None
        self.model = model or make_chat_model(os.path.join(TMP, f"{name}.gguf"), fixture, vocab, seed=7,
                                              chat_template=template)
        self.services = LocalServices(BIN, self.model, tmp_prefix=f"apeserve-chat-{name}-").start()
        self.stubs = load_stubs()
        self.enc_ch, self.dec_ch = make_channel(self.services.encoder), make_channel(self.services.decoder)

    def stop(self):
        self.enc_ch.close()
        self.dec_ch.close()
        self.services.stop()
        if self.generated:
            os.remove(self.model)  # 45-75 MB each

    def encode(self, prefix, docs, chat, dtype=0):
        return encode(self.enc_ch, prefix, docs, chat=chat, dtype=dtype, timeout=120, stubs=self.stubs)

    def ask(self, prefix, query, chat, keys=(), texts=(), mode="ape", dtype=0, max_tokens=6):
        """(generated ids, final message)."""
        msgs = list(generate(self.dec_ch, prefix, keys, query, chat=chat, mode=mode, max_tokens=max_tokens,
                             texts=texts, dtype=dtype, return_prompt_ids=True, timeout=120, stubs=self.stubs))
        return [m.token.id for m in msgs if m.HasField("token") and m.token.id >= 0], msgs[-1].final

    def model_info(self):
        _, _, dec_pb, dec_grpc = self.stubs
        enc_pb = self.stubs[0]
        return dec_grpc.DecoderStub(self.dec_ch).ModelInfo(enc_pb.ModelInfoRequest(), timeout=30)


class ChatChecks:
    """(a), (b) and the clients for one model family; subclasses set the
    files and what to expect."""
    NAME = FIXTURE = VOCAB = FAMILY = None
    ADD_BOS = None

    @classmethod
    def setUpClass(cls):
        cls.kv, _ = read_gguf(cls.VOCAB)
        cls.template = cls.kv["tokenizer.chat_template"][1]
        cls.served = Served(cls.NAME, cls.FIXTURE, cls.VOCAB)

    @classmethod
    def tearDownClass(cls):
        cls.served.stop()

    def jinja_ids(self, system, user):
        return tokenize(self.VOCAB, render(self.kv, self.template, system, user), parse_special=True)

    def test_model_info_names_the_family(self):
        info = self.served.model_info()
        self.assertEqual(info.chat_template, self.FAMILY)
        self.assertEqual(info.add_bos, self.ADD_BOS)
        r = run([f"{BIN}/apectl", "info", f"--model={self.served.model}"])
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn(f"chat template: {self.FAMILY}\n", r.stdout)

    def test_prompt_ids_are_the_jinja_rendering(self):
        s = self.served
        keys = [c.key for c in s.encode(PREFIX, DOCS, chat=True).contexts]
        want = self.jinja_ids(PREFIX, "".join(DOCS) + QUERY)
        _, fin = s.ask(PREFIX, QUERY, True, keys=keys)
        self.assertEqual(list(fin.prompt_ids), want)
        self.assertEqual(fin.usage.prompt_tokens, len(want))
        # By content: the same keys (encoder and decoder agree on the chat prefix).
        _, fin = s.ask(PREFIX, QUERY, True, texts=DOCS)
        self.assertEqual(list(fin.prompt_ids), want)
        self.assertEqual(fin.usage.encoded_tokens, 0)
        # No system text; documents not cached yet (the decoder has the
        # encoder encode them, sending the chat prefix as ids).
        fresh = [d.replace("Ann", "Dee") for d in DOCS[:2]]
        _, fin = s.ask("", QUERY, True, texts=fresh)
        self.assertGreater(fin.usage.encoded_tokens, 0)
        self.assertEqual(list(fin.prompt_ids), self.jinja_ids("", "".join(fresh) + QUERY))
        self.assertTrue(all(c.already_cached for c in s.encode("", fresh, chat=True).contexts))
        # No documents: the query is the whole user message (Llama 3 trims it).
        _, fin = s.ask(PREFIX, " What is here? ", True)
        self.assertEqual(list(fin.prompt_ids), self.jinja_ids(PREFIX, " What is here? "))

    def test_chat_entries_belong_to_the_chat_prefix(self):
        keys = [c.key for c in self.served.encode(PREFIX, DOCS[:1], chat=True).contexts]
        with self.assertRaises(grpc.RpcError) as e:
            self.served.ask(PREFIX, QUERY, False, keys=keys)
        self.assertEqual(e.exception.code(), grpc.StatusCode.FAILED_PRECONDITION, e.exception.details())

    def test_parallel_equals_sequential_equals_apectl_run(self):
        s = self.served
        want_prompt = self.jinja_ids(PREFIX, DOCS[1] + QUERY)
        seq, fin = s.ask(PREFIX, QUERY, True, texts=DOCS[1:2], mode="sequential", max_tokens=12)
        self.assertEqual(list(fin.prompt_ids), want_prompt)
        self.assertGreaterEqual(len(seq), 1)
        f32 = s.stubs[0].KV_DTYPE_FLOAT32
        par, fin = s.ask(PREFIX, QUERY, True, texts=DOCS[1:2], mode="parallel", dtype=f32, max_tokens=12)
        self.assertEqual(list(fin.prompt_ids), want_prompt)
        self.assertEqual(par, seq)
        r = run([f"{BIN}/apectl", "run", f"--model={s.model}", "--prompt-ids=" + ",".join(map(str, want_prompt)),
                 "--max-tokens=12", "--print-ids"])
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual([int(t) for t in r.stdout.strip().split(",")], seq)

    def test_clients_pass_chat_through(self):
        s = self.served
        doc_files = []
        for i, d in enumerate(DOCS[:2]):
            doc_files.append(os.path.join(TMP, f"{self.NAME}-doc{i}.txt"))
            with open(doc_files[-1], "w", encoding="utf-8") as f:
                f.write(d)
        # apectl and the clients drop a document file's trailing newlines, so
        # "attic." meets "Bob": one pre-token in Jinja's rendering, two here
        # (documents are tokenized one by one); the Jinja check is (a)'s.
        docs = [d.rstrip("\n") for d in DOCS[:2]]
        r = run([f"{BIN}/apectl", "encode", f"--encoder={s.services.encoder}", f"--prefix={PREFIX}", "--chat"]
                + doc_files)
        self.assertEqual(r.returncode, 0, r.stderr)
        keys = [line.split("\t")[0] for line in r.stdout.splitlines()]
        self.assertEqual(keys, [c.key for c in s.encode(PREFIX, docs, chat=True).contexts])
        r = run([f"{BIN}/apectl", "generate", f"--decoder={s.services.decoder}", f"--prefix={PREFIX}", "--chat",
                 "--context-key=" + ",".join(keys), f"--query={QUERY}", "--max-tokens=6", "--print-ids",
                 "--print-prompt-ids"])
        self.assertEqual(r.returncode, 0, r.stderr)
        ids, fin = s.ask(PREFIX, QUERY, True, keys=keys)
        self.assertEqual([int(t) for t in r.stdout.strip().split(",")], ids)
        self.assertIn("prompt_ids=" + ",".join(map(str, fin.prompt_ids)) + "\n", r.stderr)
        r = run([f"{BIN}/apectl", "generate", f"--decoder={s.services.decoder}", f"--prefix={PREFIX}", "--chat",
                 "--context-key=" + ",".join(keys), f"--query={QUERY}", "--max-tokens=6"])
        self.assertEqual(r.returncode, 0, r.stderr)
        text = r.stdout.rstrip("\n")
        self.assertEqual(text, fin.text)
        args = ["--encoder", s.services.encoder, "--decoder", s.services.decoder, "--prefix", PREFIX, "--doc",
                doc_files[0], "--doc", doc_files[1], "--query", QUERY, "--max-tokens", "6", "--chat"]
        r = run(["/usr/bin/python3", f"{ROOT}/clients/python/apeserve_client.py"] + args)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout.rstrip("\n"), text)
        if shutil.which("node") and os.path.isdir(f"{ROOT}/clients/node/node_modules"):
            r = run(["node", f"{ROOT}/clients/node/client.js"] + args)
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertEqual(r.stdout.rstrip("\n"), text)


class QwenChatTest(ChatChecks, unittest.TestCase):
    NAME, FAMILY, ADD_BOS = "qwen", "chatml", False
    FIXTURE = os.path.join(FAMILIES, "models", "tiny-random-qwen2-F32.gguf")
    VOCAB = os.path.join(FAMILIES, "vocab", "ggml-vocab-qwen2.gguf")

    def test_plain_requests_have_no_bos(self):
        s = self.served
        keys = [c.key for c in s.encode("Facts:\n", DOCS, chat=False).contexts]
        ids, fin = s.ask("Facts:\n", QUERY, False, keys=keys)
        want = [t for text in ["Facts:\n"] + DOCS + [QUERY] for t in tokenize(self.VOCAB, text, False)]
        self.assertEqual(list(fin.prompt_ids), want)
        self.assertNotEqual(fin.prompt_ids[0], self.kv["tokenizer.ggml.bos_token_id"][1])
        self.assertGreaterEqual(len(ids), 1)

    def test_empty_plain_prefix_is_invalid_without_bos(self):
        with self.assertRaises(grpc.RpcError) as e:
            self.served.encode("", DOCS[:1], chat=False)
        self.assertEqual(e.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("adds no BOS", e.exception.details())
        with self.assertRaises(grpc.RpcError) as e:
            self.served.ask("", QUERY, False, texts=DOCS[:1])
        self.assertEqual(e.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("adds no BOS", e.exception.details())
        _, fin = self.served.ask("", QUERY, True, texts=DOCS[:1])  # with chat the prefix holds the markers
        self.assertEqual(list(fin.prompt_ids), self.jinja_ids("", DOCS[0] + QUERY))


class Llama3ChatTest(ChatChecks, unittest.TestCase):
    NAME, FAMILY, ADD_BOS = "llama3", "llama3", True
    FIXTURE = os.path.join(FAMILIES, "models", "tiny-random-llama31-F32.gguf")
    VOCAB = os.path.join(FAMILIES, "vocab", "ggml-vocab-llama-bpe.gguf")

    def test_plain_requests_start_with_bos(self):
        _, fin = self.served.ask("", QUERY, False, texts=DOCS[:1])
        want = [128000] + tokenize(self.VOCAB, DOCS[0], False) + tokenize(self.VOCAB, QUERY, False)
        self.assertEqual(list(fin.prompt_ids), want)


class Qwen2DefaultSystemTest(unittest.TestCase):
    """A ChatML template that writes a system turn of its own when the request has no system text."""

    def test_default_system_text_is_rendered(self):
        vocab = os.path.join(FAMILIES, "vocab", "ggml-vocab-qwen2.gguf")
        kv, _ = read_gguf(vocab)
        served = Served("qwen2-default", os.path.join(FAMILIES, "models", "tiny-random-qwen2-F32.gguf"), vocab,
                        template=QWEN2_TEMPLATE)
        try:
            for system in ("", PREFIX):
                _, fin = served.ask(system, QUERY, True, texts=DOCS[:2])
                want = tokenize(vocab, render(kv, QWEN2_TEMPLATE, system, "".join(DOCS[:2]) + QUERY), True)
                self.assertEqual(list(fin.prompt_ids), want, system)
            self.assertIn("You are a helpful assistant.", render(kv, QWEN2_TEMPLATE, "", QUERY))
        finally:
            served.stop()


class NoChatTemplateTest(unittest.TestCase):
    """(c): no template (the fixture model) and a template of no known family (Phi-3's)."""

    def check_refused(self, served, family, words):
        self.assertEqual(served.model_info().chat_template, family)
        for call in (lambda: served.encode(PREFIX, DOCS[:1], chat=True),
                     lambda: served.ask(PREFIX, QUERY, True, texts=DOCS[:1])):
            with self.assertRaises(grpc.RpcError) as e:
                call()
            self.assertEqual(e.exception.code(), grpc.StatusCode.FAILED_PRECONDITION)
            self.assertIn(words, e.exception.details())
            self.assertIn("chat false", e.exception.details())
        ids, _ = served.ask(PREFIX, QUERY, False, texts=DOCS[:1])  # plain requests still work
        self.assertGreaterEqual(len(ids), 1)
        r = run([f"{BIN}/apectl", "info", f"--model={served.model}"])
        self.assertIn(f"chat template: {family}\n", r.stdout)

    def test_model_without_template(self):
        served = Served("none", model=os.path.join(FAMILIES, "models", "tiny-random-qwen2-F32.gguf"))
        try:
            self.check_refused(served, "none", "no chat template")
        finally:
            served.stop()

    def test_template_of_unknown_family(self):
        phi3, _ = read_gguf(os.path.join(DATA, "vocab", "ggml-vocab-phi-3.gguf"))
        served = Served("unknown", os.path.join(FAMILIES, "models", "tiny-random-qwen2-F32.gguf"),
                        os.path.join(FAMILIES, "vocab", "ggml-vocab-qwen2.gguf"),
                        template=phi3["tokenizer.chat_template"][1])
        try:
            self.check_refused(served, "unknown", "no family")
        finally:
            served.stop()


def tearDownModule():
    shutil.rmtree(TMP, ignore_errors=True)


if __name__ == "__main__":
    unittest.main(verbosity=2)
