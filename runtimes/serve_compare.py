"""Serving speed over HTTP: one client for any OpenAI-compatible server, and the side-by-side
run of `plt-port serve` and vLLM's OpenAI server on the same model (`plt-port serve-compare`).

The client sends N concurrent streaming `/v1/completions` requests, greedy, `ignore_eos` so
that every stream makes its `max_tokens` tokens (vLLM's field; plt-port honours it too), and
reads the token count from the usage chunk; tok/s = tokens of all streams / wall time. Beside
it, the CPU time the server's processes spent per token (Linux: /proc), which other load on a
shared machine disturbs much less than the wall time.

`compare` runs each server alone (started, warmed up with one request per batch width
measured, measured at each stream count, stopped), plt-port then vLLM for each checkpoint
format (and round), so the two alternate on the shared machine. Both get the same thread count, batch
limit and fp32. vLLM serves v2 with the project's plugin and v1 with its own model class
(plugins off: `VLLM_PLUGINS=""`).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from urllib.parse import urlsplit

from plt_port.config import PLTConfig
from plt_port.errors import PLTError
from plt_port.random_model import PRESETS, RANDOM_BASE, save_code_tokenizer, save_random_model

from exporters.export_store import export_root

STREAM_PROMPTS = ("def parse_args(argv):\n    ", "class Cache:\n    def __init__(self",
                  "import os\n\n", "def walk(root):\n    for ", "    return sorted(",
                  "with open(path) as f:\n    ")
SERVED_NAME = "bench"
MODEL_PRESET = "25m"
MAX_MODEL_LEN = 256
START_TIMEOUT_S = 600
FORMATS = {"v2": dict(model_type="iquestpltcoder", plt_num_loops=2, plt_window_size=[63, 0],
                      plt_gate_use_hidden_states=True),
           # hidden_act: read by vLLM's v1 class (released v1 checkpoints state it)
           "v1": dict(model_type="iquestloopcoder", loop_num=2, loop_window_size=64,
                      extra={"hidden_act": "silu"})}


class CompareError(PLTError):
    pass


# ---- the client ---------------------------------------------------------------------------------
def stream_completion(url: str, prompt: str, max_tokens: int,
                      model: str | None = None) -> tuple[float, float, int]:
    """(seconds to the first token, seconds in all, completion tokens) of one greedy stream."""
    import http.client

    address = urlsplit(url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=300)
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    if model is not None:
        body["model"] = model
    start = time.perf_counter()
    connection.request("POST", "/v1/completions", json.dumps(body),
                       {"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        raise CompareError(f"request to {url} failed: {response.status} "
                           f"{response.read()[:300]!r}")
    first, tokens = None, 0
    for line in response:
        if not line.startswith(b"data: {"):
            continue
        first = first or time.perf_counter() - start
        if b'"usage"' in line:  # only the last chunk: the client stays cheap
            tokens = (json.loads(line[6:]).get("usage") or {}).get("completion_tokens") or tokens
    connection.close()
    return first, time.perf_counter() - start, tokens


def concurrent_streams(url: str, streams: int, max_tokens: int,
                       model: str | None = None) -> tuple[float, list[float]]:
    """(aggregate tokens/s, time to first token of each stream) of `streams` streams at once."""
    results, errors = [None] * streams, []

    def one(i):
        try:
            results[i] = stream_completion(
                url, STREAM_PROMPTS[i % len(STREAM_PROMPTS)] + f"x{i} = ", max_tokens, model)
        except Exception as exc:  # noqa: BLE001 (raised below, in the caller's thread)
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    if errors:
        raise CompareError(f"{len(errors)} of {streams} streams failed: {errors[0]}")
    return sum(r[2] for r in results) / wall, [r[0] for r in results]


# ---- the model ----------------------------------------------------------------------------------
def compare_model_dir(fmt: str, root: str | None = None) -> str:
    """The random ~25M-parameter fp32 model of format `fmt` (v1 or v2), with a code tokenizer
    of its vocabulary, written once under the export store."""
    config = PLTConfig(**{**RANDOM_BASE, **PRESETS[MODEL_PRESET], "torch_dtype": "float32",
                          "max_position_embeddings": 2048, **FORMATS[fmt]})
    root = root or os.path.join(export_root(), "serve-compare")
    out_dir = os.path.join(root, f"{MODEL_PRESET}-{fmt}")
    existing = os.path.join(out_dir, "config.json")
    if os.path.exists(existing) and PLTConfig.from_file(existing) == config:
        return out_dir
    tokenizer_dir = os.path.join(root, f"tokenizer-{config.vocab_size}")
    if not os.path.exists(os.path.join(tokenizer_dir, "tokenizer_config.json")):
        save_code_tokenizer(tokenizer_dir, config.vocab_size)
    return save_random_model(out_dir, config, seed=0, tokenizer_dir=tokenizer_dir)


# ---- the servers --------------------------------------------------------------------------------
def plt_command(model_dir: str, port: int, threads: int, max_batch: int) -> list[str]:
    """`plt-port serve` (the script installed next to this Python)."""
    script = os.path.join(os.path.dirname(sys.executable), "plt-port")
    return [script, "serve", "--model", model_dir,
            "--port", str(port), "--threads", str(threads), "--max-batch", str(max_batch),
            "--served-model-name", SERVED_NAME]


# vLLM's own v1 class needs transformers to know the config type (a released checkpoint brings
# it as remote code): register the plugin's config class only, then run the server
UPSTREAM_V1_SERVER = (
    "import runpy, sys\n"
    "from transformers import AutoConfig\n"
    "from runtimes.models.vllm_plugin import IQuestLoopCoderConfig as Config\n"
    "AutoConfig.register(Config.model_type, Config, exist_ok=True)\n"
    "sys.argv[0] = 'api_server'\n"
    "runpy.run_module('vllm.entrypoints.openai.api_server', run_name='__main__')\n")


def vllm_command(python: str, model_dir: str, port: int, max_batch: int, fmt: str) -> list[str]:
    """v2: the project's plugin; v1: vLLM's own model class (plugins off, see vllm_env)."""
    server = ["-c", UPSTREAM_V1_SERVER] if fmt == "v1" else \
        ["-m", "vllm.entrypoints.openai.api_server"]
    return [python, *server, "--model", model_dir,
            "--host", "127.0.0.1", "--port", str(port), "--served-model-name", SERVED_NAME,
            "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN),
            "--max-num-seqs", str(max_batch), "--enforce-eager", "--seed", "0"]


def vllm_env(threads: int, fmt: str) -> dict[str, str]:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1",
           "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}", "OMP_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false"}
    if fmt == "v1":
        env["VLLM_PLUGINS"] = ""  # vLLM's own IQuestLoopCoder class, not the project's
    return env


def free_port(host: str = "127.0.0.1") -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def tree_cpu_seconds(pid: int) -> float | None:
    """CPU seconds (user + system) of process `pid` and its descendants so far; None off Linux."""
    if not os.path.exists(f"/proc/{pid}/stat"):
        return None
    parents, seconds = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rpartition(")")[2].split()  # after the command's name
        except OSError:  # ended meanwhile
            continue
        parents[int(entry)] = int(fields[1])
        seconds[int(entry)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    tree, grown = {pid}, {pid}
    while grown:
        grown = {child for child, parent in parents.items() if parent in grown}
        tree |= grown
    return sum(seconds.get(p, 0.0) for p in tree)


@contextlib.contextmanager
def running(command: list[str], env: dict[str, str] | None,
            port: int) -> Iterator[tuple[str, int]]:
    """The server `command` started: (its base URL once /health answers, its pid); stopped
    after."""
    with tempfile.TemporaryFile("w+") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(server, url, log)
            yield url, server.pid
        finally:
            server.terminate()
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def wait_healthy(server: subprocess.Popen, url: str, log) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if server.poll() is not None:
            log.seek(0)
            raise CompareError(f"{' '.join(server.args[:2])} exited ({server.returncode}):\n"
                               f"{log.read()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise CompareError(f"{' '.join(server.args[:2])} did not answer /health in "
                               f"{START_TIMEOUT_S} s")
        time.sleep(1)


def measure(url: str, pid: int, streams: Sequence[int], max_tokens: int) -> dict:
    """{"tok_s": {streams: tok/s}, "cpu_ms": {streams: server CPU ms per token}}, after a
    short warm-up at each stream count."""
    for n in streams:
        concurrent_streams(url, n, 4, SERVED_NAME)
    figures = {"tok_s": {}, "cpu_ms": {}}
    for n in streams:
        before = tree_cpu_seconds(pid)
        figures["tok_s"][n] = concurrent_streams(url, n, max_tokens, SERVED_NAME)[0]
        after = tree_cpu_seconds(pid)
        figures["cpu_ms"][n] = None if before is None else \
            (after - before) * 1e3 / (n * max_tokens)
    return figures


def compare(vllm_python: str, formats: Sequence[str] = ("v2", "v1"),
            streams: Sequence[int] = (1, 16), max_tokens: int = 64, threads: int = 2,
            rounds: int = 1, baseline: str | None = None, progress=None) -> list[dict]:
    """One row per (round, format, server): tok/s and CPU ms per token at each stream count;
    plt-port and vLLM alternate. `baseline`: a checkout of another plt-port version, served
    first in each alternation (its packages ahead on PYTHONPATH) as "plt-port (baseline)"."""
    rows = []
    batch = max(streams)
    servers = ("plt-port (baseline)",) * (baseline is not None) + ("plt-port", "vllm")
    for round_, fmt, server in itertools.product(range(rounds), formats, servers):
        model_dir, port = compare_model_dir(fmt), free_port()
        if server.startswith("plt-port"):
            command = plt_command(model_dir, port, threads, batch)
            env = None if server == "plt-port" else {**os.environ, "PYTHONPATH": baseline}
        else:
            command = vllm_command(vllm_python, model_dir, port, batch, fmt)
            env = vllm_env(threads, fmt)
        with running(command, env, port) as (url, pid):
            rows.append({"round": round_, "format": fmt, "server": server,
                         **measure(url, pid, streams, max_tokens)})
        if progress is not None:
            progress(rows[-1])
    return rows


def best_rows(rows: list[dict]) -> list[dict]:
    """Per (format, server) over the rounds: the highest tok/s and the lowest CPU ms per token
    at each stream count (other load on the machine only slows a run)."""
    best: dict[tuple[str, str], dict] = {}
    for row in rows:
        kept = best.setdefault((row["format"], row["server"]), {
            "format": row["format"], "server": row["server"], "tok_s": {}, "cpu_ms": {}})
        for n, tok_s in row["tok_s"].items():
            kept["tok_s"][n] = max(tok_s, kept["tok_s"].get(n, 0.0))
            cpu = [c for c in (row["cpu_ms"][n], kept["cpu_ms"].get(n)) if c is not None]
            kept["cpu_ms"][n] = min(cpu, default=None)
    return list(best.values())


def table(rows: list[dict]) -> str:
    """A markdown table: a row per (format, server); tok/s, then server CPU ms per token,
    a column per stream count."""
    streams = sorted(rows[0]["tok_s"])
    lines = ["| format | server | " + " | ".join(f"{n} stream{'s' * (n > 1)} tok/s"
                                                for n in streams)
             + " | " + " | ".join(f"CPU ms/token at {n}" for n in streams) + " |",
             "|---|---|" + "---:|" * 2 * len(streams)]
    for row in rows:
        cpu = [row["cpu_ms"].get(n) for n in streams]
        lines.append(f"| {row['format']} | {row['server']} | "
                     + " | ".join(f"{row['tok_s'][n]:.1f}" for n in streams) + " | "
                     + " | ".join("-" if c is None else f"{c:.2f}" for c in cpu) + " |")
    return "\n".join(lines)
