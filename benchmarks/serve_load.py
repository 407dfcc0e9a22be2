"""Bounded HTTP load for `llmos bench serve`, run as its own process: `python -m benchmarks.serve_load URL ...`.

Sends `--requests` completions at `--concurrency` to one URL on this machine and prints one JSON line:
requests/s, tokens/s, p50 and p99 latency. Every request has a timeout; the run stops by itself.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import requests

from cluster.console import at_least

PROMPTS = [
    "def main():\n    ",
    "import os\nimport sys\n\n",
    "class Parser:\n    def __init__(self",
    "for key, value in ",
]
TIMEOUT_S = 120.0


def percentile(values: Sequence[float], share: float) -> float:
    """The nearest-rank percentile: the smallest of `values` with at least `share` of them at or below it
    (the 99th of 100 values is the 99th smallest). The one definition every benchmark's p99 uses."""
    ordered = sorted(values)
    # Rounded first, so that float noise (0.55 * 100 = 55.00000000000001) does not move it up a rank.
    rank = math.ceil(round(share * len(ordered), 9))
    return ordered[max(rank, 1) - 1]


def measure(url: str, model: str, concurrency: int, count: int, max_tokens: int) -> dict:
    session = requests.Session()
    session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=concurrency))

    def one(index: int) -> tuple[float, int]:
        body = {"model": model, "prompt": PROMPTS[index % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0}
        started = time.perf_counter()
        response = session.post(url, json=body, timeout=TIMEOUT_S)
        response.raise_for_status()
        return time.perf_counter() - started, response.json()["usage"]["completion_tokens"]

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(count)))
    elapsed = time.perf_counter() - started
    latencies = [latency for latency, _ in results]
    return {
        "concurrency": concurrency,
        "requests": count,
        "requests_per_s": round(count / elapsed, 2),
        "tokens_per_s": round(sum(tokens for _, tokens in results) / elapsed, 1),
        "p50_ms": round(1000 * statistics.median(latencies), 1),
        "p99_ms": round(1000 * percentile(latencies, 0.99), 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    parser.add_argument("--model", required=True)
    parser.add_argument("--concurrency", type=at_least(1), required=True)
    parser.add_argument("--requests", type=at_least(1), required=True)
    parser.add_argument("--max-tokens", type=at_least(1), default=32)
    args = parser.parse_args(argv)
    result = measure(args.url, args.model, args.concurrency, args.requests, args.max_tokens)
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
