"""The trace benchmark on small inputs: loading, arrivals, metrics, and `llmos bench placement` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.commands import DEFAULT_TRACE_DIR, parse_seeds
from benchmarks.placement import CURVE_POINTS, run_seed
from benchmarks.placement_trace import ARRIVAL_LIMIT, load_trace
from cluster.cli import main
from cluster.console import UserError

NODES = """sn,cpu_milli,memory_mib,gpu,model
n0,32000,131072,4,V100M16
n1,32000,131072,4,V100M16
n2,96000,393216,8,G2
n3,16000,65536,2,T4
"""
PODS = """name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,qos,pod_phase,creation_time,deletion_time,scheduled_time
p0,4000,8192,1,500,,LS,Running,0,10,0
p1,8000,16384,1,1000,,LS,Running,0,10,0
p2,2000,4096,1,250,T4,BE,Running,0,10,0
p3,16000,32768,4,1000,,LS,Running,0,10,0
p4,4000,8192,0,0,,BE,Running,0,10,0
p5,4000,8192,1,810,V100M16|G2,LS,Running,0,10,0
"""


@pytest.fixture
def trace_dir(tmp_path: Path) -> Path:
    (tmp_path / "openb_node_list_gpu_node.csv").write_text(NODES)
    (tmp_path / "openb_pod_list_tiny.csv").write_text(PODS)
    return tmp_path


def test_arrivals_stop_once_the_gpu_request_passes_130_percent(trace_dir: Path):
    trace = load_trace("tiny", trace_dir)
    assert (trace.gpus, len(trace.requests)) == (18, 6)
    arrivals = trace.arrivals(seed=7)
    requested = np.cumsum(trace.request_gpus[arrivals])
    assert requested[-1] >= ARRIVAL_LIMIT * trace.gpus > requested[-2]
    assert not np.array_equal(arrivals, trace.arrivals(seed=8))


def test_gpu_spec_becomes_allowed_gpu_types(trace_dir: Path):
    trace = load_trace("tiny", trace_dir)
    assert {request.bundles[0].gpu_types for request in trace.requests} == {None, ("T4",), ("V100M16", "G2")}


@pytest.mark.parametrize("policy", ["bestfit", "fgd", "llmos", "ray-hybrid"])
def test_a_seed_run_reports_consistent_metrics(trace_dir: Path, policy: str):
    run = run_seed(load_trace("tiny", trace_dir), policy, seed=3)
    assert 0 < run.gpu_alloc_ratio <= 1
    assert run.first_failure_arrived <= ARRIVAL_LIMIT + 1
    assert 0 <= run.frag_rate_at_90 <= 1
    assert np.all(np.diff(run.curve) >= 0) and run.curve[-1] == pytest.approx(run.gpu_alloc_ratio)
    assert np.all(run.curve <= np.maximum(CURVE_POINTS, run.curve[0]) + 1e-9), "never more allocated than arrived"


def test_bench_placement_writes_the_issue_json_and_a_png(trace_dir: Path, tmp_path: Path, capsys):
    out_json, out_png = tmp_path / "out" / "r.json", tmp_path / "out" / "r.png"
    argv = ["bench", "placement", "--trace", "tiny", "--trace-dir", str(trace_dir), "--seeds", "1-2"]
    argv += ["--policy", "llmos", "--policy", "fgd", "--json", str(out_json), "--plot", str(out_png)]
    assert main(argv) == 0
    document = json.loads(out_json.read_text())
    assert list(document) == ["trace", "seeds", "nodes", "gpus", "results"]
    assert (document["trace"], document["seeds"], document["nodes"], document["gpus"]) == ("tiny", [1, 2], 4, 18)
    assert list(document["results"]) == ["llmos", "fgd"]
    for row in document["results"].values():
        assert list(row) == [
            "gpu_alloc_ratio",
            "unallocated_gpus",
            "frag_rate_at_90",
            "first_failure_arrived",
            "decisions_per_s",
        ]
        assert row["unallocated_gpus"] == pytest.approx((1 - row["gpu_alloc_ratio"]) * 18, abs=0.1)
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "llmos" in capsys.readouterr().out


def test_bad_input_is_a_clean_error(trace_dir: Path, capsys):
    assert main(["bench", "placement", "--trace", "nope", "--trace-dir", str(trace_dir)]) == 2
    assert "known traces: tiny" in capsys.readouterr().err
    with pytest.raises(UserError, match="42-51"):
        parse_seeds("forty")
    with pytest.raises(UserError, match="42-51"):
        parse_seeds("42-")  # not 42 alone
    with pytest.raises(UserError, match="more than 1000 seeds"):
        parse_seeds("1-99999999999")
    assert parse_seeds("42-44,50") == [42, 43, 44, 50]


def test_an_output_path_that_cannot_be_written_is_refused_before_the_run(trace_dir: Path, tmp_path: Path, capsys):
    (tmp_path / "a-file").touch()
    for flag, path, refusal in (
        ("--json", tmp_path, "is a directory; give the name of a file in it"),
        ("--plot", tmp_path / "a-file" / "x.png", "is a file, so"),
    ):
        with pytest.raises(SystemExit) as exit_:
            main(["bench", "placement", "--trace", "tiny", "--trace-dir", str(trace_dir), flag, str(path)])
        assert exit_.value.code == 2
        error = capsys.readouterr().err
        assert f"argument {flag}: " in error and refusal in error and "tiny:" not in error  # no run started
    written = tmp_path / "new" / "folder" / "out.json"
    assert main(["bench", "placement", "--trace", "tiny", "--trace-dir", str(trace_dir), "--json", str(written)]) == 0
    assert written.is_file()


@pytest.mark.skipif(not DEFAULT_TRACE_DIR.is_dir(), reason="the Alibaba trace is not next to the repo")
def test_real_trace_matches_the_paper_setup_and_runs_small():
    trace = load_trace("default", DEFAULT_TRACE_DIR)
    assert (len(trace.cluster.nodes), trace.gpus, len(trace.task_shape)) == (1213, 6212, 8152)
    assert len(trace.workload.covering().shapes) == 35  # FGD's target workload: 95% of tasks
    small = load_trace("default", DEFAULT_TRACE_DIR, nodes=100)
    results = {policy: run_seed(small, policy, seed=42).gpu_alloc_ratio for policy in ("random", "llmos")}
    assert results["llmos"] > results["random"] > 0.5
