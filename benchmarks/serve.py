"""`llmos bench serve`: the completions API under bounded load, batched vs unbatched, and Serve vs in-process.

One run: train a small checkpoint (or use `--checkpoint`), start a local cluster, deploy the same model
twice through the controller (`serve.batch` with max batch 32, and with batching off), then drive each
from a second process (`benchmarks.serve_load`) at each concurrency, interleaved. The in-process
figure calls the same decoder directly, one request at a time, before the cluster starts.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cluster.console import UserError, progress
from cluster.launcher import free_port, temporary_cluster
from cluster.spec import load_spec

REPO = Path(__file__).resolve().parents[1]
MAX_TOKENS = 32
LOAD_TIMEOUT_S = 600
STDERR_TAIL_CHARS = 2000  # of a failed load generator's stderr, in the error


def _train_checkpoint(directory: Path, on_progress: Callable[[str], None]) -> Path:
    from jobs.spec import load_training_job
    from jobs.training_loop import run_bare

    job = load_training_job(REPO / "examples" / "train.yaml").model_copy(
        update={"steps": 40, "storage_path": str(directory), "name": "bench-lm"}
    )
    job = job.model_copy(update={"checkpoint": job.checkpoint.model_copy(update={"every_steps": 40})})
    on_progress("training a small checkpoint for the benchmark (40 steps)")
    run_bare(job, workers=1, echo=False)
    return directory / "bench-lm" / "checkpoints"


def _direct_tokens_per_s(checkpoint: Path, count: int) -> float:
    import torch

    from benchmarks.serve_load import PROMPTS
    from jobs.checkpoint import load_model
    from jobs.data import encode
    from serving.app import resolve_checkpoint
    from serving.decoding import BatchDecoder, Generation

    torch.set_num_threads(1)  # as each Serve replica does
    decoder = BatchDecoder(load_model(resolve_checkpoint(str(checkpoint))))
    tokens = 0
    started = time.perf_counter()
    for index in range(count):
        generation = Generation(encode(PROMPTS[index % len(PROMPTS)]), MAX_TOKENS, temperature=0.0)
        tokens += len(decoder.complete([generation])[0][0])
    return tokens / (time.perf_counter() - started)


def _load(url: str, model: str, concurrency: int, count: int) -> dict:
    command = [
        sys.executable,
        "-m",
        "benchmarks.serve_load",
        url,
        "--model",
        model,
        "--concurrency",
        str(concurrency),
        "--requests",
        str(count),
        "--max-tokens",
        str(MAX_TOKENS),
    ]
    what = f"the load generator (benchmarks.serve_load) against {url} at concurrency {concurrency}"
    try:
        output = subprocess.run(command, capture_output=True, text=True, timeout=LOAD_TIMEOUT_S, cwd=REPO)
    except subprocess.TimeoutExpired:
        raise UserError(f"{what} did not finish within {LOAD_TIMEOUT_S} s; give fewer --requests") from None
    if output.returncode != 0:
        raise UserError(f"{what} failed (exit {output.returncode}):\n{output.stderr[-STDERR_TAIL_CHARS:].strip()}")
    return json.loads(output.stdout.strip().splitlines()[-1])


def run(
    *,
    checkpoint: Path | None = None,
    concurrencies: tuple[int, ...] = (1, 8, 32),
    requests_per_level: int = 64,
    plot_path: Path | None = None,
    on_progress: Callable[[str], None] = progress,
) -> dict:
    from serving.app import resolve_checkpoint

    if checkpoint is not None:
        try:
            resolve_checkpoint(str(checkpoint))
        except FileNotFoundError:
            raise UserError(
                f"--checkpoint {checkpoint}: no checkpoint there; give a checkpoint folder or a folder of them "
                "(a job's checkpoints/), or leave --checkpoint out to train a small one"
            ) from None
    with tempfile.TemporaryDirectory(prefix="llmos-bench-serve-", ignore_cleanup_errors=True) as workdir:
        checkpoint = checkpoint or _train_checkpoint(Path(workdir), on_progress)
        results, direct = _measure(checkpoint, concurrencies, requests_per_level, on_progress)

    def tokens_per_s(batched: bool, concurrency: int) -> float:
        return next(r["tokens_per_s"] for r in results if r["batched"] is batched and r["concurrency"] == concurrency)

    top = max(concurrencies)
    report = {
        f"batched_vs_unbatched_c{top}": round(tokens_per_s(True, top) / tokens_per_s(False, top), 2),
        "serve_vs_direct": round(tokens_per_s(True, 1) / direct, 3),
        "direct_tokens_per_s": round(direct, 1),
        "max_tokens": MAX_TOKENS,
        "results": results,
    }
    if plot_path:
        plot(results, plot_path)
    return report


def _measure(
    checkpoint: Path, concurrencies: tuple[int, ...], requests_per_level: int, on_progress: Callable[[str], None]
) -> tuple[list[dict], float]:
    """Every load result, and the decoder's own tokens/s in-process."""
    from ray import serve

    from cluster.admin import Admin
    from cluster.inventory import connect
    from serving.deploy import delete, deploy
    from serving.spec import ServeJob

    on_progress("measuring the decoder in-process (one request at a time)")
    direct = _direct_tokens_per_s(checkpoint, count=16)

    port = free_port()
    results: list[dict] = []
    with temporary_cluster(load_spec(REPO / "examples" / "cluster.yaml"), on_progress=on_progress):
        connect()
        admin = Admin()
        urls = {}
        for batched in (True, False):
            name = "bench-batched" if batched else "bench-unbatched"
            job = ServeJob(
                name=name,
                team="research",
                checkpoint=str(checkpoint),
                pool="cpu",
                route_prefix=f"/{name}",
                batching={"max_batch_size": 32 if batched else 1, "wait_timeout_s": 0.005},
                limits={"max_tokens": MAX_TOKENS},
            )
            urls[batched] = deploy(job, admin, port=port, on_progress=on_progress).url
        for concurrency in concurrencies:
            for batched in (True, False):
                name = "bench-batched" if batched else "bench-unbatched"
                result = _load(urls[batched], name, concurrency, max(requests_per_level, 2 * concurrency))
                results.append({"batched": batched, **result})
                on_progress(
                    f"{'batched' if batched else 'unbatched'} c={concurrency}: {result['tokens_per_s']:.0f} tokens/s, "
                    f"p50 {result['p50_ms']:.0f} ms, p99 {result['p99_ms']:.0f} ms"
                )
        for name in ("bench-batched", "bench-unbatched"):
            delete(name, admin)
        serve.shutdown()
    return results, direct


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (latency, throughput) = plt.subplots(1, 2, figsize=(10, 4))
    for batched, colour in ((True, "tab:blue"), (False, "tab:orange")):
        rows = sorted((r for r in results if r["batched"] is batched), key=lambda r: r["concurrency"])
        label = "batched (serve.batch, 32)" if batched else "unbatched"
        levels = [r["concurrency"] for r in rows]
        latency.plot(levels, [r["p50_ms"] for r in rows], "o-", color=colour, label=f"{label} p50")
        latency.plot(levels, [r["p99_ms"] for r in rows], "o--", color=colour, label=f"{label} p99")
        throughput.plot(levels, [r["tokens_per_s"] for r in rows], "o-", color=colour, label=label)
    for axis, title, unit in ((latency, "Latency", "ms"), (throughput, "Throughput", "tokens/s")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent clients")
        axis.set_ylabel(unit)
        axis.set_title(title)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
