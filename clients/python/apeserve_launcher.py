#!/usr/bin/python3
"""Private apeserve services for tests and benchmarks: a redis-server,
ape-encoder and ape-decoder on free loopback ports, with a temporary folder
for Redis and the logs, all stopped and removed at the end.

  from apeserve_launcher import LocalServices, default_bin_dir, test_data_dir
  data = test_data_dir()
  with LocalServices(default_bin_dir(), f"{data}/stories260K.bin", f"{data}/tok512.bin") as s:
      ...  # gRPC to s.encoder and s.decoder ("127.0.0.1:<port>")

Importing this module starts nothing and writes nothing.
"""
import os
import shutil
import socket
import subprocess
import tempfile
import time

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def default_bin_dir():
    """$APE_BIN_DIR, else <repo>/build/bin."""
    return os.environ.get("APE_BIN_DIR") or os.path.join(REPO_ROOT, "build", "bin")


def test_data_dir():
    """$APE_TEST_DATA, else <repo>/tests/data (models, tokenizers, goldens)."""
    return os.environ.get("APE_TEST_DATA") or os.path.join(REPO_ROOT, "tests", "data")


def free_ports(n):
    """n distinct loopback ports free right now (all held open while picking,
    so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class LocalServices:
    """redis-server + ape-encoder + ape-decoder on free loopback ports.

    bin_dir holds ape-encoder and ape-decoder; model (and tokenizer, for
    llama2.c checkpoints) is given to both servers; encoder_args and
    decoder_args are extra absl flags ("--max_prompt_tokens=...") for one
    server. Use as a context manager, or call start() and stop().

    After start(): .encoder and .decoder are "127.0.0.1:<port>", .redis_port
    and .redis_uri the private Redis, .tmp the temporary folder, .logs maps
    "redis", "encoder", "decoder" to their log files (in .tmp, removed by
    stop() unless keep_tmp)."""

    NAMES = ("redis", "encoder", "decoder")

    def __init__(self, bin_dir, model, tokenizer="", encoder_args=(), decoder_args=(), startup_timeout=60.0,
                 stop_timeout=10.0, keep_tmp=False, tmp_prefix="apeserve-"):
        self.bin_dir, self.model, self.tokenizer = bin_dir, model, tokenizer
        self.encoder_args, self.decoder_args = list(encoder_args), list(decoder_args)
        self.startup_timeout, self.stop_timeout = startup_timeout, stop_timeout
        self.keep_tmp, self.tmp_prefix = keep_tmp, tmp_prefix
        self.tmp, self.logs, self.encoder, self.decoder, self.redis_port = None, {}, None, None, None
        self._procs, self._files = [], []

    @property
    def redis_uri(self):
        return f"redis://127.0.0.1:{self.redis_port}"

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False

    def start(self):
        """Starts the three processes, each waited for until it listens;
        on any failure stops what was started and raises RuntimeError with
        the end of the failing process's log. Returns self."""
        if self._procs:
            raise RuntimeError("LocalServices already started")
        for b in ("ape-encoder", "ape-decoder"):
            if not os.access(os.path.join(self.bin_dir, b), os.X_OK):
                raise RuntimeError(f"{b} not found in {self.bin_dir} (build it, or set APE_BIN_DIR / --bin-dir)")
        self.tmp = tempfile.mkdtemp(prefix=self.tmp_prefix)
        self.logs = {n: os.path.join(self.tmp, n + ".log") for n in self.NAMES}
        rp, ep, dp = free_ports(3)
        self.redis_port, self.encoder, self.decoder = rp, f"127.0.0.1:{ep}", f"127.0.0.1:{dp}"
        common = [f"--model={self.model}", f"--redis={self.redis_uri}"]
        if self.tokenizer:
            common.append(f"--tokenizer={self.tokenizer}")
        try:
            self._spawn("redis", ["redis-server", "--port", str(rp), "--bind", "127.0.0.1", "--save", "",
                                  "--dir", self.tmp], rp)
            self._spawn("encoder", [os.path.join(self.bin_dir, "ape-encoder"), f"--listen={self.encoder}"] + common
                        + self.encoder_args, ep)
            self._spawn("decoder", [os.path.join(self.bin_dir, "ape-decoder"), f"--listen={self.decoder}",
                                    f"--encoder={self.encoder}"] + common + self.decoder_args, dp)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, name, cmd, port):
        log = open(self.logs[name], "w")
        self._files.append(log)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self._procs.append(proc)
        deadline = time.monotonic() + self.startup_timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return
            except OSError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with status {proc.returncode}:\n{self.log_tail(name)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not listen on port {port} within {self.startup_timeout:.0f} s:\n"
                                   f"{self.log_tail(name)}")
            time.sleep(0.05)

    def log_tail(self, name, lines=20):
        """The last lines of a process's log ("" if none yet)."""
        try:
            with open(self.logs[name], errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except (KeyError, OSError):
            return ""

    def stop(self):
        """Stops the processes (decoder first): SIGTERM, then SIGKILL after
        stop_timeout seconds; removes the temporary folder unless keep_tmp.
        Safe to call twice."""
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs = []
        for f in self._files:
            f.close()
        self._files = []
        if self.tmp and not self.keep_tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
