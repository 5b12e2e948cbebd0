"""Hostile requests against a served `plt-port serve` process (issue 26's figures):

    python tests/hostile_server.py [--rounds N]

Starts the server (the embedded model, one thread) on a free 127.0.0.1 port, measures its
idle RSS and the peak of the largest legitimate request (a prompt of the whole context), then
sends each hostile request while another thread asks for /health every 20 ms. Prints every
case's status and seconds, the server's peak RSS during them (VmHWM, reset before each phase
through /proc/PID/clear_refs), the goal (1.2 x idle + the legitimate peak's growth) and the
slowest /health answer. Linux only (it reads /proc).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 1 << 20


def status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def reset_peak(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS


def ids_text(count: int, last: str = "") -> str:
    return "[" + ",".join(["511"] * count) + last + "]"


def hostile_cases(context: int, model: str, limit: int) -> list[tuple[str, str, bytes]]:
    """(name, path, body) of each hostile request, the largest just under the server's body
    limit; bodies are built once, up front."""
    turn = '{"role":"user","content":""}'
    return [
        ("stop string of 1 MiB", "/v1/completions", json.dumps(
            {"prompt": "def f", "max_tokens": 4, "stop": "q" * MIB}).encode()),
        ("16 stop strings of 1023 chars, 64 tokens", "/v1/completions", json.dumps(
            {"prompt": "def f", "max_tokens": 64, "stop": ["q" * 1020 + f"{i:03d}" for i in
                                                          range(16)]}).encode()),
        ("44 MiB of token ids", "/v1/completions",
         b'{"prompt": ' + ids_text(44 * MIB // 4).encode() + b"}"),
        ("a limit of token ids", "/v1/completions",
         b'{"prompt": ' + ids_text(limit // 4 - 8).encode() + b"}"),
        ("a limit of token ids ending in a string", "/v1/completions",
         b'{"prompt": ' + ids_text(limit // 4 - 10, ',"a"').encode() + b"}"),
        ("a limit of empty messages", "/v1/chat/completions",
         b'{"messages": [' + b",".join([turn.encode()] * (limit // (len(turn) + 1) - 2))
         + b"]}"),
        ("a limit of {} messages", "/v1/chat/completions",
         b'{"messages": [' + b",".join([b"{}"] * (limit // 3 - 8)) + b"]}"),
        ("a limit of bad Anthropic blocks", "/v1/messages", json.dumps(
            {"model": model, "max_tokens": 1, "messages": [
                {"role": "user", "content": [{"type": "x"}] * (limit // 15 - 8)}]}).encode()),
        ("a limit of bad logit_bias values", "/v1/completions", json.dumps(
            {"prompt": "a", "logit_bias": {str(i): "x" for i in range(limit // 16)}}).encode()),
        ("a limit of nesting", "/v1/completions",
         b'{"prompt": ' + b"[" * (limit // 2 - 8) + b"]" * (limit // 2 - 8) + b"}"),
        ("a limit of chat text", "/v1/chat/completions", json.dumps(
            {"messages": [{"role": "user", "content": "def f(x): return x\n" * (limit // 20
                                                                                 - 4)}]}).encode()),
        ("a prompt of the whole context, max_tokens past it", "/v1/completions", json.dumps(
            {"prompt": [511] * context, "max_tokens": 2}).encode()),
    ]


def post(port: int, path: str, body: bytes) -> tuple[int | str, float]:
    start = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        connection.request("POST", path, body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        data = response.read()
        json.loads(data)
        status = response.status
    except (ConnectionError, http.client.HTTPException) as exc:  # closed before all was sent
        status = type(exc).__name__
    finally:
        connection.close()
    return status, time.perf_counter() - start


class HealthProbe(threading.Thread):
    """Asks for /health every 20 ms; `slowest` is the longest answer (`case_slowest`: since
    the caller last reset it)."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.port, self.slowest, self.count, self.done = port, 0.0, 0, threading.Event()
        self.case_slowest = 0.0

    def run(self):
        while not self.done.is_set():
            start = time.perf_counter()
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            connection.request("GET", "/health")
            assert connection.getresponse().status == 200
            connection.close()
            seconds = time.perf_counter() - start
            self.slowest, self.case_slowest = max(self.slowest, seconds), \
                max(self.case_slowest, seconds)
            self.count += 1
            time.sleep(0.02)


def start_server(*args: str) -> tuple[subprocess.Popen, int]:
    sys.path.insert(0, ROOT)
    from plt_port.app.commands.serve import free_port

    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "plt_port.app.cli", "serve", "--port",
                                str(port), "--threads", "1", *args], cwd=ROOT,
                               stderr=subprocess.DEVNULL, env=os.environ | {"PYTHONPATH": ROOT})
    for _ in range(1200):
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return process, port
        except ConnectionError:
            time.sleep(0.1)
    raise SystemExit("the server did not start")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1, help="times to send the set")
    parser.add_argument("--max-request-bytes", type=int, help="the server's (default: its own)")
    args = parser.parse_args()
    limit_args = ["--max-request-bytes", str(args.max_request_bytes)] \
        if args.max_request_bytes else []
    process, port = start_server(*limit_args)
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        connection.request("GET", "/v1/models")
        card = json.loads(connection.getresponse().read())["data"][0]
        context, model = card["max_model_len"], card["id"]
        legit = json.dumps({"prompt": [511] * (context - 8), "max_tokens": 8}).encode()
        from plt_port.app.server_options import ServerOptions

        limit = ServerOptions(max_request_bytes=args.max_request_bytes).request_bytes_limit(
            context)
        cases = hostile_cases(context, model, limit)
        post(port, "/v1/completions", legit)  # warm-up
        idle = status_kib(process.pid, "VmRSS")
        reset_peak(process.pid)
        status, seconds = post(port, "/v1/completions", legit)
        legit_peak = status_kib(process.pid, "VmHWM")
        print(f"body limit {limit / MIB:g} MiB; idle RSS {idle / 1024:.0f} MiB; largest "
              f"legitimate request ({context - 8} prompt tokens): {status} in {seconds:.2f}s, "
              f"peak {legit_peak / 1024:.0f} MiB")
        probe = HealthProbe(port)
        reset_peak(process.pid)
        probe.start()
        for _ in range(args.rounds):
            for name, path, body in cases:
                probe.case_slowest = 0.0
                status, seconds = post(port, path, body)
                print(f"  {name} ({len(body) / MIB:.1f} MiB): {status} in {seconds:.2f}s, "
                      f"peak so far {status_kib(process.pid, 'VmHWM') / 1024:.0f} MiB, "
                      f"slowest /health {probe.case_slowest * 1e3:.0f} ms")
        probe.done.set()
        probe.join()
        peak = status_kib(process.pid, "VmHWM")
        goal = 1.2 * idle + (legit_peak - idle)
        print(f"hostile peak RSS {peak / 1024:.0f} MiB = {peak / idle:.2f}x idle; goal < "
              f"{goal / 1024:.0f} MiB (1.2x idle + the legitimate request's growth): "
              f"{'met' if peak < goal else 'MISSED'}")
        print(f"slowest /health of {probe.count} during them: {probe.slowest * 1e3:.0f} ms "
              f"(goal < 100 ms)")
    finally:
        process.terminate()
        process.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
