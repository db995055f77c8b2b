#!/usr/bin/python3
"""Private apeserve services for tests and benchmarks: a redis-server,
ape-encoder and ape-decoder on free loopback ports, with a temporary folder
for Redis and the logs, all stopped and removed at the end.

  from apeserve_launcher import LocalServices, default_bin_dir, test_data_dir
  data = test_data_dir()
  with LocalServices(default_bin_dir(), f"{data}/stories260K.bin", f"{data}/tok512.bin") as s:
      ...  # gRPC to s.encoder and s.decoder ("127.0.0.1:<port>")

For fault tests the running services can be disturbed and repaired:
kill(name), pause(name) / resume(name) (SIGSTOP / SIGCONT), restart(name)
(same port, same flags; Redis comes back empty), alive(name), pid(name), and
redis_command(*args) speaks to the private Redis (binary-safe RESP, no
redis-py needed).

Importing this module starts nothing and writes nothing.
"""
import os
import shutil
import signal
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


class RedisError(Exception):
    """An error reply from Redis ("-ERR ...", "-WRONGTYPE ...", "-OOM ...")."""


def wait_for_port(port, proc, what, timeout=60.0, detail=lambda: ""):
    """Returns once 127.0.0.1:port accepts connections. RuntimeError when
    `proc` exits first or `timeout` seconds pass; the message ends with
    detail() (e.g. the end of the process's log)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}:\n{detail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not listen on port {port} within {timeout:.0f} s:\n{detail()}")
        time.sleep(0.05)


def _resp_read(f):
    line = f.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError("redis closed the connection")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest
    if kind == b"-":
        raise RedisError(rest.decode(errors="replace"))
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return None
        data = f.read(n + 2)
        if len(data) != n + 2:
            raise ConnectionError("redis closed the connection")
        return data[:-2]
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [_resp_read(f) for _ in range(n)]
    raise ConnectionError(f"unexpected redis reply {line[:40]!r}")


def redis_command(port, *args, host="127.0.0.1", timeout=5.0):
    """One Redis command on a fresh connection: args are str, bytes or int
    (binary-safe). Returns the reply: bytes (simple and bulk strings), int,
    None (nil) or a list of those; raises RedisError for an error reply and
    OSError (e.g. socket.timeout, ConnectionRefusedError) when Redis cannot
    answer within timeout seconds."""
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(b), b))
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(b"".join(parts))
        with sock.makefile("rb") as f:
            return _resp_read(f)


class LocalServices:
    """redis-server + ape-encoder + ape-decoder on free loopback ports.

    bin_dir holds ape-encoder and ape-decoder; model (and tokenizer, for
    llama2.c checkpoints) is given to both servers; encoder_args and
    decoder_args are extra absl flags ("--max_prompt_tokens=...") for one
    server, redis_args extra redis-server arguments ("--maxmemory", "1mb").
    Use as a context manager, or call start() and stop().

    After start(): .encoder and .decoder are "127.0.0.1:<port>", .redis_port
    and .redis_uri the private Redis, .tmp the temporary folder, .logs maps
    "redis", "encoder", "decoder" to their log files (in .tmp, removed by
    stop() unless keep_tmp).

    Faults, by process name ("redis", "encoder", "decoder"): kill(name)
    (SIGKILL, waits for the exit), signal(name, sig), pause(name) (SIGSTOP),
    resume(name) (SIGCONT), restart(name) (stops it if still running, then
    starts the same command on the same port and waits until it listens;
    Redis keeps nothing: it restarts empty), alive(name), pid(name).
    redis_command(*args) sends one command to the private Redis."""

    NAMES = ("redis", "encoder", "decoder")

    def __init__(self, bin_dir, model, tokenizer="", encoder_args=(), decoder_args=(), startup_timeout=60.0,
                 stop_timeout=10.0, keep_tmp=False, tmp_prefix="apeserve-", redis_args=()):
        self.bin_dir, self.model, self.tokenizer = bin_dir, model, tokenizer
        self.encoder_args, self.decoder_args = list(encoder_args), list(decoder_args)
        self.redis_args = [str(a) for a in redis_args]
        self.startup_timeout, self.stop_timeout = startup_timeout, stop_timeout
        self.keep_tmp, self.tmp_prefix = keep_tmp, tmp_prefix
        self.tmp, self.logs, self.encoder, self.decoder, self.redis_port = None, {}, None, None, None
        self._procs, self._files, self._commands = {}, [], {}  # by name: Popen; open logs; (argv, port)

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
        self._commands = {
            "redis": (["redis-server", "--port", str(rp), "--bind", "127.0.0.1", "--save", "", "--dir", self.tmp]
                      + self.redis_args, rp),
            "encoder": ([os.path.join(self.bin_dir, "ape-encoder"), f"--listen={self.encoder}"] + common
                        + self.encoder_args, ep),
            "decoder": ([os.path.join(self.bin_dir, "ape-decoder"), f"--listen={self.decoder}",
                         f"--encoder={self.encoder}"] + common + self.decoder_args, dp),
        }
        try:
            for name in self.NAMES:
                self._spawn(name)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, name):
        cmd, port = self._commands[name]
        log = open(self.logs[name], "a")  # a restart appends to the same log
        self._files.append(log)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self._procs[name] = proc
        wait_for_port(port, proc, name, self.startup_timeout, detail=lambda: self.log_tail(name))

    def log_tail(self, name, lines=20):
        """The last lines of a process's log ("" if none yet)."""
        try:
            with open(self.logs[name], errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except (KeyError, OSError):
            return ""

    def log(self, name):
        """A process's whole log so far ("" if none)."""
        try:
            with open(self.logs[name], errors="replace") as f:
                return f.read()
        except (KeyError, OSError):
            return ""

    # ---- Faults -------------------------------------------------------------

    def _proc(self, name):
        if name not in self._procs:
            raise KeyError(f"no process {name!r} (started: {sorted(self._procs)})")
        return self._procs[name]

    def pid(self, name):
        """The process id of "redis", "encoder" or "decoder"."""
        return self._proc(name).pid

    def alive(self, name):
        """True while the process has not exited (a paused one is alive)."""
        return self._proc(name).poll() is None

    def returncode(self, name):
        """The exit status (negative: killed by that signal), None while alive."""
        return self._proc(name).poll()

    def signal(self, name, sig):
        """Sends sig to the process (nothing if it has exited)."""
        proc = self._proc(name)
        if proc.poll() is None:
            proc.send_signal(sig)

    def kill(self, name, timeout=10.0):
        """SIGKILL, then waits for the exit. Returns the exit status."""
        proc = self._proc(name)
        if proc.poll() is None:
            proc.kill()
        return proc.wait(timeout=timeout)

    def pause(self, name):
        """SIGSTOP: the process keeps its sockets but answers nothing."""
        self.signal(name, signal.SIGSTOP)

    def resume(self, name):
        """SIGCONT after pause()."""
        self.signal(name, signal.SIGCONT)

    def restart(self, name):
        """Stops the process if it still runs (SIGTERM, SIGKILL after
        stop_timeout), starts the same command on the same port and waits
        until it listens. Redis restarts empty (no persistence). Returns self."""
        self._terminate(self._proc(name))
        self._spawn(name)
        return self

    def redis_command(self, *args, timeout=5.0):
        """One command to the private Redis (see redis_command())."""
        return redis_command(self.redis_port, *args, timeout=timeout)

    def _terminate(self, proc):
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGCONT)  # a paused process would not act on SIGTERM
            except OSError:
                pass
            proc.terminate()
        try:
            proc.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def stop(self):
        """Stops the processes (decoder first): SIGTERM (after SIGCONT, in
        case one is paused), then SIGKILL after stop_timeout seconds; removes
        the temporary folder unless keep_tmp. Safe to call twice."""
        for name in reversed(self.NAMES):
            if name in self._procs:
                self._terminate(self._procs[name])
        self._procs = {}
        for f in self._files:
            f.close()
        self._files = []
        if self.tmp and not self.keep_tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
