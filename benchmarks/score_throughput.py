"""Throughput of phased-score against the local fake server with added latency.

Runs N items at --rpm 20000 with high concurrency, then the same at concurrency 1 (on fewer
items: at 200 ms a request, 3,000 items would take 10 minutes), and prints achieved requests/min
as a fraction of the limit. The rate is the tool's own: requests sent over the window from the
first request to the last answer, the window a requests-per-minute limit governs. The whole
call's wall time (Python start-up excluded, but importing openai, ~1.5 s, and writing the
output included) is printed beside it. The server runs in its own process so it does not
share the GIL with the client. Usage: .venv/bin/python benchmarks/score_throughput.py [--items 3000]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from phased_tools.score import main as score_main  # noqa: E402
from phased_tools.transport import pick_transport  # noqa: E402


def run_once(base_url: str, inp: Path, tmp: Path, tag: str, rpm: float, concurrency: int,
             http: str, limit: int | None) -> tuple[int, float, float]:
    """One scoring run on a fresh cache: (requests sent, sending window s, whole call s)."""
    err = io.StringIO()
    args = [str(inp), "-o", str(tmp / f"{tag}.jsonl"), "--base-url", base_url,
            "--cache", str(tmp / f"{tag}.sqlite"), "--rpm", str(rpm),
            "--concurrency", str(concurrency), "--no-progress", "--http", http]
    if limit is not None:
        args += ["--limit", str(limit)]
    t0 = time.monotonic()
    with contextlib.redirect_stderr(err):
        rc = score_main(args)
    whole = time.monotonic() - t0
    text = err.getvalue()
    if rc != 0:
        raise SystemExit(f"scoring run failed (exit {rc}):\n{text}")
    requests = int(re.search(r"requests sent ([\d,]+)", text).group(1).replace(",", ""))
    window = float(re.search(r"over the ([\d.]+) s from first request", text).group(1))
    return requests, window, whole


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=3000)
    p.add_argument("--items-c1", type=int, default=100, help="items for the concurrency-1 run")
    p.add_argument("--rpm", type=float, default=20000)
    p.add_argument("--latency", type=float, default=0.2)
    p.add_argument("--concurrency", type=int, default=128)
    p.add_argument("--http", choices=("auto", "httpx", "aiohttp"), default="auto")
    a = p.parse_args()
    os.environ.setdefault("OPENAI_API_KEY", "sk-local-benchmark")
    server = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "tools" / "fake_openai.py"), "--latency", str(a.latency)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        base_url = server.stdout.readline().strip()
        transport = pick_transport(a.http)
        print(f"server {base_url}, latency {a.latency * 1000:.0f} ms, --rpm {a.rpm:g}, "
              f"transport {transport}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d)
            inp = tmp / "in.json"
            items = [{"instruction": f"Benchmark task {i}: summarise item {i}.", "input": "",
                      "output": f"Summary {i}. " * 20} for i in range(a.items)]
            inp.write_text(json.dumps(items))
            for tag, conc, limit in (("many", a.concurrency, None), ("one", 1, a.items_c1)):
                c0 = time.process_time()
                n, window, whole = run_once(base_url, inp, tmp, tag, a.rpm, conc, a.http, limit)
                cpu_ms = (time.process_time() - c0) / n * 1000
                rate = n / window * 60
                print(f"concurrency {conc:>4}: {n:,} requests in {window:.1f} s = {rate:,.0f} requests/min"
                      f" = {rate / a.rpm:.3f} of the limit"
                      + ("  (goal >= 0.9)" if conc > 1 else "")
                      + f"  [whole call {whole:.1f} s = {n / whole * 60 / a.rpm:.3f} of the limit;"
                      f" client CPU {cpu_ms:.2f} ms/request, i.e. one free core sustains"
                      f" ~{60000 / cpu_ms:,.0f} requests/min]")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
