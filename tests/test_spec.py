"""ClusterSpec: the example loads; each kind of bad input is rejected with a message naming the field and fix."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest
import yaml
from yaml_trees import parent_of, paths

from cluster.cli import main
from cluster.requests import SubmitRequest
from cluster.spec import ClusterSpec, SpecError, format_memory, load_spec, parse_memory, parse_model
from jobs import train
from jobs.spec import TrainingJob, load_training_job
from serving.spec import ServeJob, load_serve_job

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "cluster.yaml"


@pytest.fixture()
def example() -> dict:
    return yaml.safe_load(EXAMPLE.read_text())


def problems_of(data: dict, model: type = ClusterSpec) -> list[str]:
    with pytest.raises(SpecError) as caught:
        parse_model(model, data, "spec.yaml")
    return caught.value.problems


def test_example_loads_with_every_accelerator_kind():
    spec = load_spec(EXAMPLE)
    kinds = {pool.accelerator.value for pool in spec.pools}
    gpu_types = {pool.accelerator_type for pool in spec.pools if pool.accelerator.value == "gpu"}
    assert kinds == {"cpu", "gpu", "tpu"}
    assert len(gpu_types) >= 2
    tpu = next(pool for pool in spec.pools if pool.accelerator.value == "tpu")
    assert tpu.tpu.chips == tpu.tpu.hosts_per_slice * tpu.tpu.chips_per_host
    assert spec.team("prod").quota["gpu:H100"] == 8
    assert spec.priority_value(spec.team("prod").priority) > spec.priority_value(spec.team("interns").priority)


def test_unknown_field_names_the_field_and_suggests_the_fix(example):
    example["pools"][1]["node"]["gpu"] = example["pools"][1]["node"].pop("gpus")
    (problem,) = problems_of(example)
    assert problem.startswith("pools[1].node.gpu: unknown field")
    assert "did you mean 'gpus'" in problem


def test_a_list_whose_only_item_is_bad_is_reported_once_not_also_as_too_short():
    bad_bundle = {"team": "research", "gang": {"name": "t", "bundles": [{"resources": {"GPUs": 4}}]}}
    (problem,) = problems_of(bad_bundle, SubmitRequest)
    assert problem.startswith("gang.bundles[0].resources: resource 'GPUs' is not one llmos places")
    no_bundles = {"team": "research", "gang": {"name": "t", "bundles": []}}
    assert problems_of(no_bundles, SubmitRequest) == ["gang.bundles: needs at least 1 item, got 0"]


def test_unknown_top_level_field(example):
    example["pool"] = []
    (problem,) = problems_of(example)
    assert problem.startswith("pool: unknown field")
    assert "did you mean 'pools'" in problem


def test_a_key_that_is_no_plain_name_is_quoted_with_its_quotes_escaped(example):
    example["pools"][1]["node"]['it\'s "odd"'] = 1  # found by the fuzzer: a key holding both quotes
    (problem,) = problems_of(example)
    assert problem.startswith('pools[1].node["it\'s \\"odd\\""]: unknown field'), problem
    del example["pools"][1]["node"]['it\'s "odd"']
    example["pools"][1]["node"]["gpus\n"] = 1  # `$` matches before a final newline; the key is not plain
    (problem,) = problems_of(example)
    assert problem.startswith('pools[1].node["gpus\\n"]: unknown field'), problem


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (("pools", 0, "nodes", "min"), -1, "pools[0].nodes.min: Input should be greater than or equal to 0"),
        (("pools", 0, "node", "cpus"), -4, "pools[0].node.cpus: Input should be greater than 0"),
        (("pools", 0, "node", "memory"), "32GB", "pools[0].node.memory: '32GB' is not a memory size"),
        (("pools", 0, "nodes"), {"min": 5, "max": 2}, "pools[0].nodes: min (5) is above max (2)"),
        (("teams", 0, "quota", "gpu"), -2, "teams[0].quota: quota gpu is -2; a quota cannot be negative"),
        (("pools", 1, "node", "gpus"), 0, "pools[1]: a gpu pool needs node.gpus >= 1"),
        (("pools", 1, "accelerator_type"), "h100", "should be written 'H100'"),
        (("pools", 0, "name"), "CPU_Pool", "pools[0].name: 'CPU_Pool' is not a valid name"),
        (("pools", 0, "labels"), {"llmos.io/pool": "x"}, "uses a reserved prefix"),
        (("teams", 0, "priority"), "urgent", "teams[0].priority: 'urgent' is not a priority class"),
        (
            ("pools", 1, "accelerator"),
            "gpus",
            "pools[1].accelerator: 'gpus' is not a choice (did you mean 'gpu'?); use 'cpu', 'gpu' or 'tpu'",
        ),
    ],
)
def test_bad_values_name_field_and_fix(example, path, value, expected):
    parent_of(example, path)[path[-1]] = value
    problems = problems_of(example)
    assert any(expected in problem for problem in problems), problems


@pytest.mark.parametrize(
    ("model", "name"), [(ClusterSpec, "cluster.yaml"), (TrainingJob, "train.yaml"), (ServeJob, "serve.yaml")]
)
def test_no_number_of_an_example_takes_infinity_or_nan(model: type, name: str):
    # Either would pass every bound a field has (NaN compares false): a quota of no limit, a learning rate
    # that diverges at once, a batch that waits forever.
    data = yaml.safe_load((EXAMPLE.parent / name).read_text())
    numbers = [
        path
        for path in paths(data)
        if path and isinstance(number := parent_of(data, path)[path[-1]], int | float) and not isinstance(number, bool)
    ]
    assert len(numbers) >= 9
    for path in numbers:
        for value in (float("inf"), float("nan")):
            broken = copy.deepcopy(data)
            parent_of(broken, path)[path[-1]] = value
            field = ".".join(str(key) for key in path if not isinstance(key, int))
            problems = problems_of(broken, model)
            assert any("Input should be a finite number" in problem for problem in problems), (field, problems)


def test_gpu_pool_without_gpus_names_the_fix(example):
    del example["pools"][1]["node"]["gpus"]
    (problem,) = problems_of(example)
    assert "pools[1]" in problem and "needs node.gpus >= 1" in problem and "gpus: 8" in problem


def test_tpu_topology_must_match_hosts_times_chips(example):
    example["pools"][3]["tpu"]["topology"] = "4x4x4"
    (problem,) = problems_of(example)
    assert problem.startswith("pools[3].tpu: topology 4x4x4 has 64 chips")
    assert "2 x 4 = 8" in problem and "set hosts_per_slice to 16" in problem


def test_tpu_pool_is_sized_in_slices(example):
    example["pools"][3]["nodes"] = example["pools"][3].pop("slices")
    (problem,) = problems_of(example)
    assert "pools[3]" in problem and "sized in whole slices" in problem


def test_duplicate_pool_names(example):
    example["pools"].append(copy.deepcopy(example["pools"][0]))
    (problem,) = problems_of(example)
    assert problem == "pools[4].name: 'cpu' is used twice; names must be unique"


def test_no_worker_pool_takes_the_head_nodes_pool_name(example):
    example["pools"][0]["name"] = "head"
    (problem,) = problems_of(example)
    assert problem.startswith("pools[0].name: 'head' is the head node's pool") and "another name" in problem
    example["pools"][0]["name"] = "head-cpu"  # only the name itself is the head's
    assert ClusterSpec.model_validate(example).pools[0].name == "head-cpu"


def test_quota_naming_unknown_resource_lists_valid_keys(example):
    example["teams"][0]["quota"]["gpus"] = 4
    (problem,) = problems_of(example)
    assert problem.startswith("teams[0].quota: 'gpus' is not a resource of this cluster (did you mean 'gpu'?)")
    assert "gpu:H100" in problem and "tpu:v5p" in problem


def test_quota_for_accelerator_type_not_in_any_pool(example):
    example["teams"][0]["quota"]["gpu:T4"] = 1
    (problem,) = problems_of(example)
    assert "'gpu:T4' is not a resource of this cluster" in problem


def test_several_problems_are_all_reported(example):
    example["pools"][0]["node"]["cpus"] = 0
    example["pools"][2]["node"]["memory"] = "lots"
    problems = problems_of(example)
    assert len(problems) == 2
    assert any(p.startswith("pools[0].node.cpus") for p in problems)
    assert any(p.startswith("pools[2].node.memory") for p in problems)


def test_invalid_yaml_reports_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("pools:\n  - name: cpu\n    node: {cpus: 4\n")
    with pytest.raises(SpecError) as caught:
        load_spec(bad)
    assert "not valid YAML" in caught.value.problems[0] and "line" in caught.value.problems[0]


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(SpecError, match="file not found"):
        load_spec(tmp_path / "nope.yaml")


def test_a_directory_or_binary_file_is_a_clear_error_on_every_entry_point(tmp_path, capsys):
    binary = tmp_path / "model.bin"
    binary.write_bytes(bytes(range(128, 256)))
    for path, problem in ((tmp_path, "is a directory"), (binary, "is not a text file (not UTF-8)")):
        with pytest.raises(SpecError, match=re.escape(f"is not a valid YAML file:\n  - {problem}; give the path")):
            load_spec(path)
        for command in (["spec", "validate", str(path)], ["submit", str(path)], ["up", str(path)]):
            assert main(command) == 2
            assert problem in capsys.readouterr().err
        assert main(["pools", "import", str(path), "-o", str(tmp_path / "out.yaml")]) == 2
        assert f"{path}: {problem}" in capsys.readouterr().err
        assert train.main([str(path)]) == 2
        assert problem in capsys.readouterr().err


def test_memory_quantities_round_trip():
    assert parse_memory("32Gi") == 32 * 2**30
    assert parse_memory("4G") == 4 * 10**9
    assert parse_memory(1024) == 1024
    assert format_memory(parse_memory("85Gi")) == "85Gi"
    assert format_memory(3072) == "3Ki" and parse_memory("3Ki") == 3072
    with pytest.raises(ValueError, match="not a memory size"):
        parse_memory("12 parsecs")


@pytest.mark.parametrize("memory", [".inf", "-.inf", ".nan", "9" * 400 + "Gi", 2**63])
def test_memory_no_node_can_have_is_refused_naming_the_field(tmp_path, capsys, example, memory):
    example["pools"][0]["node"]["memory"] = yaml.safe_load(memory) if isinstance(memory, str) else memory
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(example))
    assert main(["spec", "validate", str(bad), "--json"]) == 1
    (problem,) = json.loads(capsys.readouterr().out)["problems"]
    assert problem.startswith("pools[0].node.memory: "), problem


@pytest.mark.parametrize(
    ("kubernetes", "problem"),
    [
        ({"ray_version": "latest"}, "kubernetes.ray_version: 'latest' is not a Ray version like 2.60.0"),
        ({"ray_version": ""}, "kubernetes.ray_version: '' is not a Ray version"),
        ({"ray_version": "2.9.0"}, "kubernetes.ray_version: 2.9.0 is older than 2.52.0, the first Ray KubeRay runs"),
    ],
)
def test_a_ray_version_kuberay_cannot_run_is_refused_naming_the_field(example, kubernetes, problem):
    example["kubernetes"].update(kubernetes)
    (found,) = problems_of(example)
    assert found.startswith(problem), found


@pytest.mark.parametrize("ray_version", ["2.60", "2.60.0rc1", "2.61.0.dev0"])
def test_a_ray_version_is_taken_as_kuberay_takes_it(example, ray_version):
    example["kubernetes"]["ray_version"] = ray_version
    assert ClusterSpec.model_validate(example).kubernetes.ray_version == ray_version


def test_a_ray_older_than_token_auth_runs_with_token_auth_off(example):
    example["kubernetes"].update(ray_version="2.9.0", token_auth=False)
    assert ClusterSpec.model_validate(example).kubernetes.ray_version == "2.9.0"


def test_cli_spec_validate_prints_ok_or_problems(tmp_path, capsys, example):
    assert main(["spec", "validate", str(EXAMPLE)]) == 0
    assert capsys.readouterr().out.strip() == "ok: a ClusterSpec"
    example["pools"][0]["nodez"] = example["pools"][0].pop("nodes")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(example))
    assert main(["spec", "validate", str(bad), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False and out["kind"] == "cluster"
    assert [problem.split(":")[0] for problem in out["problems"]] == ["pools[0].nodez"]  # nodes has a default


def test_cli_spec_validate_knows_each_kind_of_llmos_file_and_reports_the_closest(tmp_path, capsys):
    examples = EXAMPLE.parent
    for name, kind in (("train.yaml", "training"), ("serve.yaml", "serving")):
        assert main(["spec", "validate", str(examples / name), "--json"]) == 0
        assert json.loads(capsys.readouterr().out) == {"ok": True, "kind": kind, "problems": []}
    job = yaml.safe_load((examples / "train.yaml").read_text())
    job["step"] = job.pop("steps")
    typo = tmp_path / "typo.yaml"
    typo.write_text(yaml.safe_dump(job))
    assert main(["spec", "validate", str(typo)]) == 1
    out = capsys.readouterr().out  # a TrainingJob with a typo, not a ClusterSpec full of unknown fields
    assert out.startswith(f"{typo} is not a valid TrainingJob:") and "did you mean 'steps'" in out
    assert main(["spec", "validate", str(examples / "train.yaml"), "--kind", "serving", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["kind"] == "serving"


def test_cli_spec_validate_checks_a_job_against_a_cluster(tmp_path, capsys):
    job = yaml.safe_load((EXAMPLE.parent / "train.yaml").read_text())
    good = tmp_path / "train.yaml"
    good.write_text(yaml.safe_dump(job))
    assert main(["spec", "validate", str(good), "--cluster", str(EXAMPLE)]) == 0
    assert capsys.readouterr().out.strip() == f"ok: a TrainingJob, fit for {EXAMPLE}"
    job |= {"team": "reserch", "pool": None, "accelerator_type": None, "resources": {"cpus": 300}}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(job))
    assert main(["spec", "validate", str(bad), "--cluster", str(EXAMPLE), "--json"]) == 1
    problems = json.loads(capsys.readouterr().out)["problems"]
    assert problems[0].startswith("team: 'reserch' is not a team of this cluster (did you mean 'research'?)")
    assert problems[1].startswith("resources: a worker (300 cpus") and len(problems) == 2
    replicas = yaml.safe_load((EXAMPLE.parent / "serve.yaml").read_text()) | {"pool": "h200"}
    serve = tmp_path / "serve.yaml"
    serve.write_text(yaml.safe_dump(replicas))
    assert main(["spec", "validate", str(serve), "--cluster", str(EXAMPLE)]) == 1
    assert "pool: 'h200' is not a pool of this cluster (did you mean 'h100'?)" in capsys.readouterr().out


def test_a_file_of_another_kind_is_named_with_what_takes_it(tmp_path, capsys):
    examples = EXAMPLE.parent
    assert main(["submit", str(EXAMPLE)]) == 2  # refused before any cluster is reached
    err = capsys.readouterr().err
    assert f"{EXAMPLE} is not a valid SubmitRequest" in err
    assert f"hint: {EXAMPLE} is a valid ClusterSpec: give it to `llmos up FILE`" in err
    assert main(["spec", "validate", str(examples / "train.yaml"), "--kind", "serving"]) == 1
    assert "is a valid TrainingJob: give it to `python -m jobs.train FILE`" in capsys.readouterr().err
    assert train.main([str(examples / "serve.yaml")]) == 2
    assert "is a valid ServeJob: give it to `llmos serve deploy FILE`" in capsys.readouterr().err
    broken = tmp_path / "broken.yaml"
    broken.write_text("team: research\ngang: {name: x, bundles: []}\n")
    assert main(["submit", str(broken)]) == 2
    assert "hint" not in capsys.readouterr().err  # a broken request is no other kind of file


def test_a_key_written_twice_is_refused_with_its_path_and_lines_by_every_entry_point(tmp_path, capsys):
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(EXAMPLE.read_text().replace("quota: {gpu: 12,", "quota: {gpu: 4, gpu: 12,"))
    line = next(number for number, text in enumerate(cluster.read_text().splitlines(), 1) if "gpu: 4," in text)
    with pytest.raises(SpecError) as caught:
        load_spec(cluster)
    assert caught.value.problems == [
        f"teams[0].quota: key 'gpu' appears twice (line {line}, columns 13 and 21); keep one"
    ]
    assert main(["spec", "validate", str(cluster)]) == 2
    assert "teams[0].quota: key 'gpu' appears twice" in capsys.readouterr().err
    job = tmp_path / "job.yaml"
    job.write_text("name: a\nteam: research\nsteps: 10\nworkers: {max: 1}\nresources:\n  cpus: 1\n  cpus: 64\n")
    with pytest.raises(SpecError, match=r"resources: key 'cpus' appears twice \(lines 6 and 7\)"):
        load_training_job(job)
    serve = tmp_path / "serve.yaml"
    serve.write_text("name: a\nteam: research\ncheckpoint: /c\nteam: prod\n")
    with pytest.raises(SpecError, match=r"  - key 'team' appears twice \(lines 2 and 4\); keep one"):
        load_serve_job(serve)
    request = tmp_path / "request.yaml"
    request.write_text("team: research\ngang:\n  name: g\n  bundles:\n    - {resources: {GPU: 1, GPU: 8}}\n")
    assert main(["submit", str(request)]) == 2  # refused before any cluster is reached
    assert "gang.bundles[0].resources: key 'GPU' appears twice" in capsys.readouterr().err
    alike = tmp_path / "alike.yaml"
    alike.write_text("labels: {yes: a, true: b}\n")  # YAML 1.1 reads both as the boolean true
    with pytest.raises(SpecError, match="labels: key True appears twice"):
        load_spec(alike)


def test_merge_keys_and_aliases_are_not_duplicates(tmp_path):
    spec = tmp_path / "cluster.yaml"
    spec.write_text(
        "pools:\n"
        "  - {name: a, accelerator: cpu, node: &small {cpus: 8, memory: 32Gi}, nodes: {max: 1}}\n"
        "  - {name: b, accelerator: cpu, node: *small, nodes: {max: 1}}\n"
        "  - {name: c, accelerator: cpu, node: {<<: *small, cpus: 16}, nodes: {max: 1}}\n"
    )
    assert [pool.node.cpus for pool in load_spec(spec).pools] == [8, 8, 16]


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (("name",), "demo\n", "name: 'demo\\n' is not a valid name"),
        (("pools", 0, "name"), "cpu\n", "pools[0].name: 'cpu\\n' is not a valid name"),
        (("teams", 0, "name"), "research\n", "teams[0].name: 'research\\n' is not a valid name"),
        (("pools", 1, "accelerator_type"), "H100\n", "pools[1].accelerator_type: 'H100\\n' is not an accelerator"),
        (("pools", 3, "tpu", "topology"), "2x2x\u0662", "pools[3].tpu.topology: '2x2x\u0662' is not a TPU topology"),
        (("pools", 0, "node", "memory"), "\u0663\u0662Gi", "pools[0].node.memory: '\u0663\u0662Gi' is not a memory"),
    ],
)
def test_a_final_newline_or_a_digit_of_another_script_is_no_part_of_a_name_or_number(example, path, value, expected):
    # `$` matches before a final newline, and `\d` matches any script's digits (int('٢') is 2).
    parent_of(example, path)[path[-1]] = value
    assert any(problem.startswith(expected) for problem in problems_of(example)), problems_of(example)
    job = yaml.safe_load((EXAMPLE.parent / "train.yaml").read_text()) | {"name": "stdlib-lm\n"}
    assert problems_of(job, TrainingJob)[0].startswith("name: 'stdlib-lm\\n' is not a valid name")


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (("name",), "1demo", "name: '1demo' must start with a letter: it names a KubeRay object"),
        (("pools", 0, "labels"), {"fabric": "nv link"}, "pools[0].labels.fabric: 'nv link' is not a Kubernetes label"),
        (("pools", 0, "labels"), {"tier": "a" * 64}, f"pools[0].labels.tier: '{'a' * 64}' is not a Kubernetes label"),
        (
            ("pools", 0, "labels"),
            {"Zone/x y": "a"},
            "pools[0].labels[\"Zone/x y\"]: 'Zone/x y' is not a Kubernetes label key",
        ),
        (("pools", 0, "labels"), {"Ex_ample.com/tier": "a"}, "'Ex_ample.com/tier' is not a Kubernetes label key"),
        (
            ("pools", 0, "labels"),
            {"rack": 42},
            'pools[0].labels.rack: 42 is read as a number, and a label value is text; quote it: "42"',
        ),
        (("pools", 0, "labels"), {"spot": True}, "pools[0].labels.spot: true is read as a boolean"),
        (
            ("teams", 0, "namespace"),
            "Research_NS",
            "teams[0].namespace: 'Research_NS' is not a Kubernetes namespace name",
        ),
        (("head", "memory"), 0, "head.memory: must be more than 0 bytes"),
        (("pools", 0, "nodes", "max"), 2**31, "pools[0].nodes.max: 2147483648 is more than Kubernetes takes here"),
        (
            ("pools", 3, "tpu"),
            {"topology": "2x2x2", "hosts_per_slice": 2**31},
            "pools[3].tpu.hosts_per_slice: 2147483648 is",
        ),
        (("kubernetes", "idle_timeout_seconds"), 2**31, "kubernetes.idle_timeout_seconds: 2147483648 is more than"),
        (
            ("kubernetes", "controller_state"),
            {"size": 0},
            "kubernetes.controller_state.size: must be more than 0 bytes",
        ),
        (
            ("kubernetes", "controller_state"),
            {"storage_class": "Fast_SSD"},
            "'Fast_SSD' is not a Kubernetes object name",
        ),
        (
            ("kubernetes", "shared_storage"),
            {"claim": "my claim"},
            "kubernetes.shared_storage.claim: 'my claim' is not a",
        ),
        (
            ("kubernetes", "shared_storage"),
            {"size": "0Gi"},
            "kubernetes.shared_storage.size: must be more than 0 bytes",
        ),
        (
            ("kubernetes", "gcs_fault_tolerance"),
            {"redis_address": "redis:6379", "redis_password_secret": "Redis_Secret"},
            "kubernetes.gcs_fault_tolerance.redis_password_secret: 'Redis_Secret' is not a Kubernetes object name",
        ),
        (
            ("kubernetes", "pools"),
            {"h100": {"node_selector": {"gpu type": "H100"}}},
            "kubernetes.pools.h100.node_selector[\"gpu type\"]: 'gpu type' is not a Kubernetes label key",
        ),
        (
            ("kubernetes", "pools"),
            {"h100": {"node_taints": [{"key": "nvidia.com/gpu", "value": "yes please"}]}},
            "kubernetes.pools.h100.node_taints[0].value: 'yes please' is not a Kubernetes label value",
        ),
    ],
)
def test_what_the_spec_hands_to_kubernetes_follows_kubernetes_syntax(example, path, value, expected):
    parent_of(example, path)[path[-1]] = value
    problems = problems_of(example)
    assert any(expected in problem for problem in problems), problems


def test_kubernetes_syntax_takes_what_kubernetes_takes(example):
    example["pools"][0]["labels"] = {"example.com/tier": "a-b_c.D9", "empty": "", "Rack": "42"}
    example["pools"][0]["nodes"]["max"] = 2**31 - 1
    example["teams"][0]["namespace"] = "0-research"
    example["kubernetes"]["pools"] = {
        "h100": {"node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}, "node_taints": [{"key": "gpu"}]}
    }
    spec = parse_model(ClusterSpec, example, "spec.yaml")
    assert spec.pools[0].labels["Rack"] == "42" and spec.team("research").kubernetes_namespace == "0-research"


def test_a_job_or_served_model_is_named_as_kuberay_names_its_rayjob_or_rayservice():
    for model, name in ((TrainingJob, "train.yaml"), (ServeJob, "serve.yaml")):
        data = yaml.safe_load((EXAMPLE.parent / name).read_text()) | {"name": "7b-run"}
        assert problems_of(data, model) == [
            "name: '7b-run' must start with a letter: it names a KubeRay object (RayCluster, RayJob or RayService), "
            "whose name KubeRay takes only as a DNS-1035 label"
        ]


@pytest.mark.parametrize(
    ("generation", "topology", "expected"),
    [
        (
            "v5e",
            "2x2x2",
            "tpu.topology 2x2x2 does not fit v5e, whose slices have 2-dimensional topologies (AxB, e.g. 2x4)",
        ),
        (
            "v6e",
            "2x2x2",
            "tpu.topology 2x2x2 does not fit v6e, whose slices have 2-dimensional topologies (AxB, e.g. 2x4)",
        ),
        (
            "v5p",
            "2x4",
            "tpu.topology 2x4 does not fit v5p, whose slices have 3-dimensional topologies (AxBxC, e.g. 2x2x4)",
        ),
        (
            "v4",
            "2x4",
            "tpu.topology 2x4 does not fit v4, whose slices have 3-dimensional topologies (AxBxC, e.g. 2x2x4)",
        ),
    ],
)
def test_a_tpu_topology_has_the_dimensions_of_its_generation(example, generation, topology, expected):
    example["pools"][3] |= {"accelerator_type": generation, "tpu": {"topology": topology, "hosts_per_slice": 2}}
    assert problems_of(example)[0] == f"pools[3]: {expected}"


def test_chips_per_host_must_divide_the_chips_of_a_slice(example):
    example["pools"][3]["tpu"] = {"topology": "2x2x1", "chips_per_host": 3, "hosts_per_slice": 1}
    assert problems_of(example) == [
        "pools[3].tpu: topology 2x2x1 has 4 chips, which chips_per_host (3) does not divide; chips_per_host must "
        "divide the chip count, as every host of a slice holds as many chips"
    ]


@pytest.mark.parametrize(
    ("generation", "topology", "chips_per_host", "hosts"),
    [
        ("v5p", "2x2x2", 8, "4"),
        ("v4", "2x2x1", 1, "4"),
        ("v5e", "2x4", 2, "1 or 4 or 8"),
        ("v6e", "4x4", 16, "1 or 4 or 8"),
    ],
)
def test_chips_per_host_must_be_a_host_of_the_generation(example, generation, topology, chips_per_host, hosts):
    hosts_per_slice = math.prod(map(int, topology.split("x"))) // chips_per_host
    example["pools"][3] |= {
        "accelerator_type": generation,
        "tpu": {"topology": topology, "chips_per_host": chips_per_host, "hosts_per_slice": hosts_per_slice},
    }
    (problem,) = problems_of(example)
    assert problem.startswith(
        f"pools[3]: tpu.chips_per_host {chips_per_host} is not a {generation} host, which has {hosts} chips"
    ), problem


def test_a_cluster_spec_with_many_broken_fields_is_still_reported_as_a_cluster_spec(tmp_path, capsys):
    # More problems as a ClusterSpec than as a ServeJob, but its keys are a ClusterSpec's.
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        "name: Bad_Name\n"
        "head: {cpus: -1, extra: 1}\n"
        "pools:\n"
        "  - {name: cpu, accelerator: cpu, node: {cpus: 0, memory: 0}, nodes: {min: 0, max: 0}}\n"
        "  - {name: gpu, accelerator: gpu, accelerator_type: h100, node: {cpus: 8, gpu: 8}, nodes: {max: 1}}\n"
        "teams:\n"
        "  - {name: a, quota: {gpu: -1}, priority: urgent}\n"
    )
    assert main(["spec", "validate", str(broken), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["kind"] == "cluster" and len(out["problems"]) > 6


@pytest.mark.parametrize(
    ("route_prefix", "expected"),
    [
        ("v1 api", "route_prefix: 'v1 api' must start with '/', e.g. /v1"),
        ("/v1/", "route_prefix: '/v1/' may not end with '/' (only / itself does); write /v1"),
        ("/v1/{model}", "route_prefix: '/v1/{model}' may not hold '{' or '}': Ray Serve routes take no wildcards"),
    ],
)
def test_a_route_prefix_is_one_ray_serve_takes(route_prefix, expected):
    serve = yaml.safe_load((EXAMPLE.parent / "serve.yaml").read_text())
    assert problems_of(serve | {"route_prefix": route_prefix}, ServeJob) == [expected]
    assert (
        parse_model(ServeJob, serve | {"route_prefix": "/v1/stdlib-lm"}, "serve.yaml").route_prefix == "/v1/stdlib-lm"
    )


@pytest.mark.parametrize("name", ["admin", "unknown"])
def test_a_team_may_not_take_a_name_the_admin_api_gives_its_admin_or_an_unknown_caller(example, name):
    example["teams"][0]["name"] = name
    (problem,) = problems_of(example)
    assert problem.startswith("teams[0].name:") and f"'{name}' is reserved" in problem
