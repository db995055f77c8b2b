#!/usr/bin/python3
"""Private apeserve services for tests and benchmarks: a redis-server,
ape-encoder and ape-decoder on free loopback ports, with a temporary folder
for Redis and the logs, all stopped and removed at the end.

  from apeserve_launcher import LocalServices, default_bin_dir, test_data_dir
  data = test_data_dir()
  with LocalServices(default_bin_dir(), f"{data}/stories260K.bin", f"{data}/tok512.bin") as s:
      ...  # gRPC to s.encoder and s.decoder ("127.0.0.1:<port>")

Larger set-ups: encoders=N and decoders=N start N of each (every decoder
sends misses to all encoders, round-robin: --encoder=ipv4:A,B);
redis_cluster=M starts an M-master Redis Cluster on loopback instead of one
redis-server (processes "redis0".."redisM-1"; servers get
--redis=redis+cluster://...; cluster_cli(i, ...), cluster_node_id(i),
dbsize(i), reshard(from, to, slots)); metrics=True gives each server
--metrics_listen on a free port (.metrics[name] = "127.0.0.1:<port>").
RedisCluster is the cluster alone, for other harnesses.

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
import threading
import time

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def default_bin_dir():
    """$APE_BIN_DIR, else <repo>/build/bin."""
    return os.environ.get("APE_BIN_DIR") or os.path.join(REPO_ROOT, "build", "bin")


def test_data_dir():
    """$APE_TEST_DATA, else <repo>/tests/data (models, tokenizers, goldens)."""
    return os.environ.get("APE_TEST_DATA") or os.path.join(REPO_ROOT, "tests", "data")


_port_lock = threading.Lock()
_port_range = None  # [lo, hi, next] once use_port_range set one


def use_port_range(spec):
    """Makes free_ports take its loopback ports from `spec` ("21400-21499")
    instead of the kernel's ephemeral range (a shared machine where each user
    owns a range). Empty `spec`: no change. Picks go round the range, so
    successive calls get other ports."""
    global _port_range
    if spec:
        lo, hi = (int(x) for x in spec.split("-"))
        _port_range = [lo, hi, lo]


def free_ports(n):
    """n distinct loopback ports free right now (all held open while picking,
    so they differ)."""
    socks = []
    try:
        with _port_lock:
            if _port_range is None:
                for _ in range(n):
                    s = socket.socket()
                    s.bind(("127.0.0.1", 0))
                    socks.append(s)
            else:
                lo, hi, _ = _port_range
                for _ in range(hi - lo + 1):
                    if len(socks) == n:
                        break
                    port = _port_range[2]
                    _port_range[2] = lo + (port + 1 - lo) % (hi - lo + 1)
                    s = socket.socket()
                    try:
                        s.bind(("127.0.0.1", port))
                    except OSError:
                        s.close()
                        continue
                    socks.append(s)
                if len(socks) < n:
                    raise RuntimeError(f"fewer than {n} free ports in {lo}-{hi}")
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


def redis_cli(port, *args, timeout=120.0):
    """`redis-cli -p port args...`: returns its stdout (str); RuntimeError
    with its output when it fails."""
    r = subprocess.run(["redis-cli", "-p", str(port)] + [str(a) for a in args], capture_output=True, text=True,
                       timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"redis-cli -p {port} {' '.join(map(str, args))}: {r.stdout}{r.stderr}")
    return r.stdout


class RedisCluster:
    """An M-master Redis Cluster (no replicas) on free loopback ports, in
    `tmp`: redis-server --cluster-enabled yes per master, then
    `redis-cli --cluster create ... --cluster-replicas 0 --cluster-yes`, and
    a wait until every node says cluster_state:ok. Masters keep serving
    their slots when another is down (cluster-require-full-coverage no).

    start(spawn) takes a function spawn(name, argv, port) that starts and
    waits for one process (LocalServices passes its own, so the nodes are
    "redis0".. for kill()); by default they are started here. .ports,
    .uri ("redis+cluster://127.0.0.1:P0,..."), cli(i, *args), node_id(i),
    dbsize(i), keys_on(i, pattern), reshard(from_i, to_i, slots), stop()."""

    def __init__(self, tmp, masters=3, node_timeout_ms=2000):
        self.tmp, self.masters, self.node_timeout_ms = tmp, masters, node_timeout_ms
        self.ports, self._own = [], []

    @property
    def uri(self):
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def _spawn_own(self, name, argv, port):
        log = open(os.path.join(self.tmp, name + ".log"), "a")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self._own.append((proc, log))
        wait_for_port(port, proc, name, 30)

    def start(self, spawn=None):
        ports = free_ports(2 * self.masters)
        self.ports, buses = ports[:self.masters], ports[self.masters:]
        for i, (port, bus) in enumerate(zip(self.ports, buses)):
            argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                    "--dir", self.tmp, "--cluster-enabled", "yes", "--cluster-port", str(bus),
                    "--cluster-config-file", f"nodes-{port}.conf", "--cluster-node-timeout",
                    str(self.node_timeout_ms), "--cluster-require-full-coverage", "no"]
            (spawn or self._spawn_own)(f"redis{i}", argv, port)
        redis_cli(self.ports[0], "--cluster", "create", *[f"127.0.0.1:{p}" for p in self.ports],
                  "--cluster-replicas", "0", "--cluster-yes")
        self.wait_ok()
        return self

    def wait_ok(self, timeout=30.0, nodes=None):
        """Waits until every node (of `nodes`, default all) reports
        cluster_state:ok and knows all masters' slots."""
        deadline = time.monotonic() + timeout
        for i in (range(self.masters) if nodes is None else nodes):
            while "cluster_state:ok" not in redis_cli(self.ports[i], "cluster", "info"):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis cluster node {self.ports[i]} not ok within {timeout:.0f} s")
                time.sleep(0.05)

    def cli(self, i, *args, timeout=120.0):
        return redis_cli(self.ports[i], *args, timeout=timeout)

    def node_id(self, i):
        return self.cli(i, "cluster", "myid").strip()

    def dbsize(self, i):
        return int(self.cli(i, "dbsize").strip())

    def keys_on(self, i, pattern="*"):
        """Keys master i holds (KEYS: for tests on small data sets only)."""
        return set(k for k in self.cli(i, "keys", pattern).splitlines() if k)

    def reshard(self, from_i, to_i, slots):
        """Moves `slots` slots from master from_i to master to_i
        (redis-cli --cluster reshard), keys and all. Blocks until done."""
        return self.cli(from_i, "--cluster", "reshard", f"127.0.0.1:{self.ports[from_i]}", "--cluster-from",
                        self.node_id(from_i), "--cluster-to", self.node_id(to_i), "--cluster-slots", str(slots),
                        "--cluster-yes", timeout=300)

    def stop(self):
        for proc, log in self._own:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            log.close()
        self._own = []


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
                 stop_timeout=10.0, keep_tmp=False, tmp_prefix="apeserve-", redis_args=(), encoders=1, decoders=1,
                 redis_cluster=0, metrics=False):
        self.bin_dir, self.model, self.tokenizer = bin_dir, model, tokenizer
        self.encoder_args, self.decoder_args = list(encoder_args), list(decoder_args)
        self.redis_args = [str(a) for a in redis_args]
        self.startup_timeout, self.stop_timeout = startup_timeout, stop_timeout
        self.keep_tmp, self.tmp_prefix = keep_tmp, tmp_prefix
        self.n_encoders, self.n_decoders, self.redis_cluster, self.want_metrics = encoders, decoders, redis_cluster, metrics
        self.tmp, self.logs, self.encoder, self.decoder, self.redis_port = None, {}, None, None, None
        self.encoders, self.decoders, self.metrics, self.cluster = [], [], {}, None
        self.names = []  # started processes, in start order
        self._procs, self._files, self._commands = {}, [], {}  # by name: Popen; open logs; (argv, port)

    @property
    def redis_uri(self):
        return self.cluster.uri if self.cluster else f"redis://127.0.0.1:{self.redis_port}"

    @property
    def encoder_target(self):
        """What the decoders get as --encoder: the one encoder, or all of
        them as an ipv4: list (the decoder balances round-robin)."""
        if len(self.encoders) == 1:
            return self.encoders[0]
        return "ipv4:" + ",".join(self.encoders)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False

    def start(self):
        """Starts Redis (or the cluster), the encoders and the decoders, each
        waited for until it listens; on any failure stops what was started
        and raises RuntimeError with the end of the failing process's log.
        Returns self."""
        if self._procs:
            raise RuntimeError("LocalServices already started")
        for b in ("ape-encoder", "ape-decoder"):
            if not os.access(os.path.join(self.bin_dir, b), os.X_OK):
                raise RuntimeError(f"{b} not found in {self.bin_dir} (build it, or set APE_BIN_DIR / --bin-dir)")
        self.tmp = tempfile.mkdtemp(prefix=self.tmp_prefix)
        try:
            self._start_redis()
            ports = free_ports((self.n_encoders + self.n_decoders) * (2 if self.want_metrics else 1))
            enc_names = ["encoder"] + [f"encoder{i}" for i in range(1, self.n_encoders)]
            dec_names = ["decoder"] + [f"decoder{i}" for i in range(1, self.n_decoders)]
            self.encoders = [f"127.0.0.1:{ports.pop(0)}" for _ in enc_names]
            self.decoders = [f"127.0.0.1:{ports.pop(0)}" for _ in dec_names]
            self.encoder, self.decoder = self.encoders[0], self.decoders[0]
            common = [f"--model={self.model}", f"--redis={self.redis_uri}"]
            if self.tokenizer:
                common.append(f"--tokenizer={self.tokenizer}")
            for names, addrs, binary, extra in ((enc_names, self.encoders, "ape-encoder", self.encoder_args),
                                                (dec_names, self.decoders, "ape-decoder", self.decoder_args)):
                for name, addr in zip(names, addrs):
                    argv = [os.path.join(self.bin_dir, binary), f"--listen={addr}"] + common
                    if binary == "ape-decoder":
                        argv.append(f"--encoder={self.encoder_target}")
                    if self.want_metrics:
                        self.metrics[name] = f"127.0.0.1:{ports.pop(0)}"
                        argv.append(f"--metrics_listen={self.metrics[name]}")
                    self._register(name, argv + extra, int(addr.rsplit(":", 1)[1]))
        except BaseException:
            self.stop()
            raise
        return self

    def _start_redis(self):
        if self.redis_cluster:
            self.cluster = RedisCluster(self.tmp, self.redis_cluster)
            self.cluster.start(spawn=self._register)
            return
        self.redis_port = free_ports(1)[0]
        self._register("redis", ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
                                 "--dir", self.tmp] + self.redis_args, self.redis_port)

    def _register(self, name, argv, port):
        self._commands[name] = (argv, port)
        self.logs[name] = os.path.join(self.tmp, name + ".log")
        self.names.append(name)
        self._spawn(name)

    # ---- Redis Cluster (redis_cluster=M) --------------------------------------

    def cluster_cli(self, i, *args, timeout=120.0):
        """redis-cli on cluster node i; returns its stdout."""
        return self.cluster.cli(i, *args, timeout=timeout)

    def cluster_node_id(self, i):
        return self.cluster.node_id(i)

    def dbsize(self, i=0):
        """Keys on cluster node i (or on the single Redis)."""
        return self.cluster.dbsize(i) if self.cluster else int(self.redis_command("DBSIZE"))

    def reshard(self, from_i, to_i, slots):
        return self.cluster.reshard(from_i, to_i, slots)

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
        """One command to the private Redis (see redis_command()); with a
        cluster, to node 0."""
        return redis_command(self.cluster.ports[0] if self.cluster else self.redis_port, *args, timeout=timeout)

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
        for name in reversed(self.names):
            if name in self._procs:
                self._terminate(self._procs[name])
        self._procs = {}
        for f in self._files:
            f.close()
        self._files = []
        if self.tmp and not self.keep_tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
