"""The trace benchmark on small inputs: loading, arrivals, metrics, and `llmos bench placement` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import commands
from benchmarks.commands import DEFAULT_TRACE_DIR, parse_seeds
from benchmarks.placement import CURVE_POINTS, PolicyResult, SeedRun, describe_seeds, run_seed
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
            "frag_rate_seeds",
            "first_failure_arrived",
            "first_failure_seeds",
            "decisions_per_s",
        ]
        assert (row["frag_rate_seeds"], row["first_failure_seeds"]) == (2, 2)
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


def test_seeds_are_refused_backwards_or_twice():
    with pytest.raises(UserError, match="range 51-42 runs backwards; write 42-51"):
        parse_seeds("51-42")
    with pytest.raises(UserError, match="names 43, 44 more than once"):
        parse_seeds("42-44,43,44")
    with pytest.raises(UserError, match="names 7 more than once"):
        parse_seeds("7,7")


def test_seeds_are_described_as_ranges_and_singles():
    assert describe_seeds([42, 43, 44, 50]) == "42-44, 50"
    assert describe_seeds([1, 3, 4]) == "1, 3-4"
    assert describe_seeds([42]) == "42"


def _seed_run(frag_rate: float | None, first_failure: float | None) -> SeedRun:
    return SeedRun(0.9, frag_rate, first_failure, decisions=10, seconds=1.0, curve=np.zeros(len(CURVE_POINTS)))


def test_a_figure_a_seed_lacks_is_left_out_of_the_mean_not_counted_as_zero():
    result = PolicyResult.of([_seed_run(0.2, None), _seed_run(0.4, 0.95), _seed_run(None, None)], gpus=100)
    row = result.as_json()
    assert (row["frag_rate_at_90"], row["frag_rate_seeds"]) == (pytest.approx(0.3), 2)
    assert (row["first_failure_arrived"], row["first_failure_seeds"]) == (0.95, 1)
    nothing = PolicyResult.of([_seed_run(None, None)], gpus=100).as_json()
    assert (nothing["frag_rate_at_90"], nothing["first_failure_arrived"]) == (None, None)
    assert (nothing["frag_rate_seeds"], nothing["first_failure_seeds"]) == (0, 0)


def test_the_table_is_printed_before_the_json_is_written(trace_dir: Path, tmp_path: Path, capsys, monkeypatch):
    def refuse(path: Path, document: dict) -> None:
        raise PermissionError(f"cannot write {path}")

    monkeypatch.setattr(commands, "write_json", refuse)
    argv = ["bench", "placement", "--trace", "tiny", "--trace-dir", str(trace_dir), "--seeds", "1,3"]
    with pytest.raises(PermissionError):
        main([*argv, "--policy", "llmos", "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert "tiny: mean of seeds 1, 3" in out and "llmos" in out


NODE_HEADER = "sn,cpu_milli,memory_mib,gpu,model\n"
POD_HEADER = "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec\n"


@pytest.mark.parametrize(
    ("row", "refusal"),
    [
        ("p1,,100,1,500,", "line 3: cpu_milli='' must be a whole number ≥ 0"),
        ("p1,1000.5,100,1,500,", "line 3: cpu_milli='1000.5' must be a whole number ≥ 0"),
        ("p1,1000,100,1,-5,", "line 3: gpu_milli='-5' must be a whole number ≥ 0"),
        ("p1,1000,100", "line 3: num_gpu is missing; the row has fewer fields than the header"),
        ("p1,0,0,0,0,", "line 3: resources: the bundle asks for nothing"),
    ],
)
def test_a_bad_pod_row_is_refused_naming_file_line_and_column(trace_dir: Path, row: str, refusal: str):
    (trace_dir / "openb_pod_list_bad.csv").write_text(f"{POD_HEADER}p0,1000,100,1,500,\n{row}\n")
    with pytest.raises(UserError) as refused:
        load_trace("bad", trace_dir)
    assert str(refused.value).startswith(f"{trace_dir / 'openb_pod_list_bad.csv'} {refusal}")


def test_a_pod_list_without_gpu_tasks_is_refused_instead_of_arriving_forever(trace_dir: Path):
    (trace_dir / "cpu_only.csv").write_text(f"{POD_HEADER}p0,1000,100,0,0,\np1,2000,100,0,0,\n")
    with pytest.raises(UserError, match=r"--trace .*cpu_only.csv: no task asks for a GPU"):
        load_trace(str(trace_dir / "cpu_only.csv"), trace_dir)


@pytest.mark.parametrize(
    ("pods", "refusal"),
    [("", "has no column cpu_milli, memory_mib, num_gpu, gpu_milli"), (POD_HEADER, "has a header but no rows")],
)
def test_an_empty_pod_list_is_refused(trace_dir: Path, pods: str, refusal: str):
    (trace_dir / "openb_pod_list_empty.csv").write_text(pods)
    with pytest.raises(UserError, match=refusal):
        load_trace("empty", trace_dir)


@pytest.mark.parametrize(
    ("nodes", "refusal"),
    [
        (NODE_HEADER, "has a header but no rows"),
        (f"{NODE_HEADER}c0,64000,262144,0,\n", "no node has a GPU"),
        (f"{NODE_HEADER}n0,64000,262144,two,V100\n", "line 2: gpu='two' must be a whole number ≥ 0"),
    ],
)
def test_a_bad_node_list_is_refused_with_and_without_nodes(trace_dir: Path, nodes: str, refusal: str):
    (trace_dir / "openb_node_list_gpu_node.csv").write_text(nodes)
    for count in (None, 3):
        with pytest.raises(UserError, match=refusal):
            load_trace("tiny", trace_dir, nodes=count)


def test_a_node_listed_twice_is_refused(trace_dir: Path):
    (trace_dir / "openb_node_list_gpu_node.csv").write_text(NODE_HEADER + "n0,64000,262144,2,V100\n" * 2)
    with pytest.raises(UserError, match="node name 'n0' appears twice"):
        load_trace("tiny", trace_dir)


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
