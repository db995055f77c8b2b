#!/usr/bin/python3
"""Load sweep: aggregate decode tokens/s, TTFT and inter-token latency at 1, 2,
4 and 8 concurrent client streams against a local apeserve, in one command:

  /usr/bin/python3 bench/run_load.py

It starts a private redis-server and ape-encoder, then for each stream count
an ape-decoder (--max_concurrent = the stream count, or --width N for a fixed
batch width) on free loopback ports, runs build/bin/bench_load against it
(documents pre-encoded by key, a seeded mix of contexts, modes and
max_tokens; --seconds per point), and writes bench/results/load.json (one
record per stream count), load.md (how to run, the table, the ratios the
issue targets, the load average) and load.png (bench/plot_load.py). Every
process it started is stopped at the end, also on an error or a signal.

The default model is a random-weight GGUF of Qwen2.5-0.5B's shape in Q8_0
with the real Qwen2 vocabulary (bench/make_random_gguf.py), made once into
$TMPDIR/apeserve-bench-models/ (~510 MB): decode is then bound by reading
~0.5 GB of weights per step, as with a real model, not by the tiny project
model's overheads. --model uses another GGUF (it must tokenize text).

Options worth knowing: --streams 1,2,4,8; --seconds 40; --width N; --ports
LO-HI (take the servers' ports from this range instead of any free port);
--bench-args "--modes=ape,parallel,sequential --max_tokens=128" (extra
bench_load flags, appended so they override); --decoder-args "..." (extra
ape-decoder flags); --out DIR (default bench/results).
"""
import argparse
import datetime
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(ROOT, "clients", "python"))
from apeserve_launcher import free_ports, use_port_range, wait_for_port  # noqa: E402

# The request mix of the committed results (bench_load flags).
DEFAULT_BENCH_ARGS = ["--num_documents=16", "--document_words=200", "--contexts=1,2,4", "--modes=ape,parallel",
                      "--max_tokens=16,32,64", "--context_by=key", "--seed=1"]


class Processes:
    """Processes started here, stopped in reverse order by stop() (SIGTERM,
    then SIGKILL after 10 s); logs in `tmp`."""

    def __init__(self, tmp):
        self.tmp, self.procs = tmp, []  # [(name, Popen, log file)]

    def start(self, name, argv, port, env=None):
        log = open(os.path.join(self.tmp, name + ".log"), "a")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        self.procs.append((name, proc, log))
        wait_for_port(port, proc, name, 120, detail=lambda: self.tail(name))
        return proc

    def tail(self, name, lines=15):
        try:
            with open(os.path.join(self.tmp, name + ".log"), errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def stop(self, name=None):
        keep = []
        for entry in reversed(self.procs):
            n, proc, log = entry
            if name is not None and n != name:
                keep.insert(0, entry)
                continue
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            log.close()
        self.procs = keep


def default_model():
    folder = os.path.join(tempfile.gettempdir(), "apeserve-bench-models")
    path = os.path.join(folder, "random-qwen2.5-0.5b-q8_0.gguf")
    if not os.path.exists(path):
        os.makedirs(folder, exist_ok=True)
        print(f"run_load: writing {path} (bench/make_random_gguf.py)", file=sys.stderr)
        subprocess.run([sys.executable, os.path.join(ROOT, "bench", "make_random_gguf.py"), "--out", path],
                       check=True)
    return path


def load_average():
    return [round(x, 2) for x in os.getloadavg()]


def write_markdown(path, records, args, command, width_note):
    one = records[0] if records and records[0]["streams"] == 1 else None
    doc_tokens = records[0].get("document_tokens_mean", 0) if records else 0
    lines = [
        "# Load: concurrent streams against one ape-decoder",
        "",
        "Reproduce (starts redis-server, ape-encoder and one ape-decoder per point on free loopback ports,",
        "stops them at the end; needs `cmake --build build --target bench_load ape-encoder ape-decoder`):",
        "",
        "```",
        "/usr/bin/python3 bench/run_load.py            # this file, load.json, load.png",
        "```",
        "",
        "Redis and the encoder start once; the documents are encoded once before the first point (a few",
        "minutes on 2 busy cores); each point then starts its own decoder and runs --seconds (default 40).",
        "The first run also writes the random model (bench/make_random_gguf.py, ~510 MB in $TMPDIR).",
        "Options: --streams 1,2,4,8, --seconds, --width N (fixed --max_concurrent), --model, --bench-args,",
        "--decoder-args, --ports LO-HI; `bench_load --help` for the mix.",
        "",
        f"This run: `{command}`, {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}, "
        f"{os.cpu_count()} cores.",
        "",
        f"Model: {records[0]['model'] if records else '?'} (`{records[0]['model_path'] if records else '?'}`). "
        f"Decoder: {width_note}. Mix: `{' '.join(DEFAULT_BENCH_ARGS + shlex.split(args.bench_args))}`, "
        f"{args.seconds:g} s per point.",
        "",
        "| streams | requests (ok/cut/err) | tokens/s | x 1 stream | TTFT p50 ms | TTFT p99 ms | ITL p50 ms "
        "| ITL p99 ms | ITL p99 x 1 stream | errors | load avg (1/5/15 min, before) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in records:
        tps_x = r["tokens_per_second"] / one["tokens_per_second"] if one and one["tokens_per_second"] else 0
        itl_x = r["itl_p99_ms"] / one["itl_p99_ms"] if one and one["itl_p99_ms"] else 0
        codes = ", ".join(f"{k} {v}" for k, v in r.get("errors_by_code", {}).items()) or "0"
        lines.append(f"| {r['streams']} | {r['requests']} ({r['ok']}/{r['cut']}/{r['errors']}) "
                     f"| {r['tokens_per_second']:.2f} | {tps_x:.2f} | {r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} "
                     f"| {r['itl_p50_ms']:.1f} | {r['itl_p99_ms']:.1f} | {itl_x:.2f} | {codes} "
                     f"| {' / '.join(str(x) for x in r['load_average_before'])} |")
    last = records[-1] if records else None
    if one and last and last is not one:
        lines += ["", f"Issue 14 target at {last['streams']} streams: tokens/s >= 4x one stream's (here "
                      f"{last['tokens_per_second'] / max(one['tokens_per_second'], 1e-9):.2f}x) with ITL p99 <= 3x "
                      f"one stream's (here {last['itl_p99_ms'] / max(one['itl_p99_ms'], 1e-9):.2f}x)."]
    lines += [
        "",
        "![tokens/s and ITL against streams](load.png)",
        "",
        "## What is measured",
        "",
        "bench_load (bench/bench_load.cc) runs N client streams, each a thread with its own gRPC channel",
        "(its own connection), sending Decoder.Generate requests back to back; request i of the run is a",
        f"pure function of (seed, i): 1, 2 or 4 of 16 generated documents (~{doc_tokens:.0f} tokens each, encoded once",
        "through Encoder.Encode and named by cache key), APE or PARALLEL, max_tokens 16, 32 or 64,",
        "greedy. Each stream first sends one unmeasured 4-token request (warm-up).",
        "",
        "- **tokens/s**: generated tokens received while all N streams were busy (from when the last",
        "  stream sent its first request to the end of the --seconds window), divided by that time:",
        "  the server's aggregate decode rate at N concurrent requests, including their prefills.",
        "- **TTFT**: request sent to first token message, per request (queueing, cache load, prefill).",
        "- **ITL**: time between consecutive token messages of a request, over all requests' gaps.",
        "- **errors**: requests that ended with a non-OK gRPC status; requests still running at the end",
        "  of the window are cancelled by the client (\"cut\") and are no error; their tokens count.",
        "- load average: `os.getloadavg()` just before each point (the machine is shared; 1/5/15 min).",
        "",
        "A point's numbers come from one run; compare ratios within one run of this script. On a machine",
        "that other processes keep busy, a server with more threads also gets a larger share of the cores,",
        "which flatters the points with more streams: read them next to the load average.",
        "",
        "The decoder batches: --max_concurrent streams share one decode step per engine iteration (each",
        "weight matrix read once for all of them), and a newcomer's prompt is prefilled --prefill_chunk",
        "tokens (default 32) per iteration, riding along in the step where it fits (docs/APE.md section 9).",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="GGUF model (default: the random Qwen2.5-0.5B-shaped Q8_0 one)")
    ap.add_argument("--streams", default="1,2,4,8")
    ap.add_argument("--seconds", type=float, default=40, help="measured seconds per point")
    ap.add_argument("--width", type=int, default=0,
                    help="decoder --max_concurrent for every point (0: = the point's stream count)")
    ap.add_argument("--bin", default=os.path.join(ROOT, "build", "bin"))
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--ports", default="", help="LO-HI: use ports from this range (default: any free ones)")
    ap.add_argument("--bench-args", default="", help="extra bench_load flags")
    ap.add_argument("--decoder-args", default="", help="extra ape-decoder flags")
    ap.add_argument("--keep-logs", action="store_true", help="keep the temporary folder with the servers' logs")
    args = ap.parse_args()
    streams = [int(x) for x in args.streams.split(",")]
    for b in ("bench_load", "ape-encoder", "ape-decoder"):
        if not os.access(os.path.join(args.bin, b), os.X_OK):
            sys.exit(f"run_load: {b} not found in {args.bin} (cmake --build build --target bench_load ape-encoder "
                     f"ape-decoder)")
    model = args.model or default_model()

    # SIGTERM / SIGHUP end the run through the finally below, like Ctrl-C.
    def on_signal(signum, _frame):
        raise SystemExit(f"run_load: signal {signum}, stopping")
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    server_env = dict(os.environ)
    tmp = tempfile.mkdtemp(prefix="apeserve-load-")
    procs = Processes(tmp)
    records = []
    bench = None
    ok = False
    try:
        use_port_range(args.ports)
        redis_port, enc_port, dec_port = free_ports(3)
        redis_uri = f"redis://127.0.0.1:{redis_port}"
        encoder = f"127.0.0.1:{enc_port}"
        decoder = f"127.0.0.1:{dec_port}"
        procs.start("redis", ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--dir", tmp, "--maxmemory", "2gb"], redis_port)
        procs.start("encoder", [os.path.join(args.bin, "ape-encoder"), f"--listen={encoder}", f"--redis={redis_uri}",
                                f"--model={model}"], enc_port, server_env)
        for n in streams:
            width = args.width or n
            procs.start("decoder", [os.path.join(args.bin, "ape-decoder"), f"--listen={decoder}",
                                    f"--redis={redis_uri}", f"--encoder={encoder}", f"--model={model}",
                                    f"--max_concurrent={width}", f"--max_queue={max(16, 2 * n)}"]
                        + shlex.split(args.decoder_args), dec_port, server_env)
            mix = DEFAULT_BENCH_ARGS + shlex.split(args.bench_args)
            if not records:
                # Setup, not measured: the documents are encoded into Redis
                # once (one request of one token), so that no point pays it.
                t = time.monotonic()
                print("run_load: encoding the documents", file=sys.stderr)
                subprocess.run([os.path.join(args.bin, "bench_load"), f"--decoder={decoder}", f"--encoder={encoder}",
                                "--streams=1", "--requests=1", "--seconds=0", "--warmup=false"] + mix
                               + ["--max_tokens=1"], stdout=subprocess.DEVNULL, check=True)
                print(f"run_load: setup took {time.monotonic() - t:.0f} s", file=sys.stderr)
            before = load_average()
            out_json = os.path.join(tmp, f"load-{n}.json")
            argv = [os.path.join(args.bin, "bench_load"), f"--decoder={decoder}", f"--encoder={encoder}",
                    f"--streams={n}", f"--seconds={args.seconds:g}", f"--json_out={out_json}",
                    f"--markdown_header={'true' if not records else 'false'}"] + mix
            print(f"run_load: {n} streams, decoder --max_concurrent={width}, load average {before}", file=sys.stderr)
            t_point = time.monotonic()
            bench = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
            stdout, _ = bench.communicate()
            if bench.returncode != 0:
                raise RuntimeError(f"bench_load exited with {bench.returncode}; decoder log:\n"
                                   f"{procs.tail('decoder')}")
            print("\n".join(l for l in stdout.splitlines() if l.startswith("|")), flush=True)
            with open(out_json) as f:
                record = json.loads(f.read())
            record.update(decoder_max_concurrent=width, load_average_before=before, load_average_after=load_average())
            records.append(record)
            procs.stop("decoder")
            print(f"run_load: {n} streams done in {time.monotonic() - t_point:.0f} s", file=sys.stderr)
        ok = True
    finally:
        if bench is not None and bench.poll() is None:
            bench.kill()
            bench.wait()
        procs.stop()
        if args.keep_logs or not ok:
            print(f"run_load: logs kept in {tmp}", file=sys.stderr)
        else:
            for name in os.listdir(tmp):
                path = os.path.join(tmp, name)
                if os.path.isfile(path):
                    os.remove(path)
            os.rmdir(tmp)

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "load.json"), "w") as f:
        json.dump(records, f, indent=1)
        f.write("\n")
    width_note = (f"--max_concurrent={args.width} for every point" if args.width
                  else "--max_concurrent = the point's stream count")
    if args.decoder_args:
        width_note += f", `{args.decoder_args}`"
    command = " ".join(["bench/run_load.py"] + [shlex.quote(a) for a in sys.argv[1:]])
    write_markdown(os.path.join(args.out, "load.md"), records, args, command, width_note)
    subprocess.run([sys.executable, os.path.join(ROOT, "bench", "plot_load.py"), os.path.join(args.out, "load.json"),
                    os.path.join(args.out, "load.png")], check=True)
    print(f"run_load: wrote {args.out}/load.json, load.md, load.png", file=sys.stderr)


if __name__ == "__main__":
    main()
