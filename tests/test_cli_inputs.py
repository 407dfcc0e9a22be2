"""What the `llmos` CLI does with odd input: text that looks like markup, paths with spaces, files it did
not write, and the forms of a value the spec itself accepts. None of it needs a cluster."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from cluster import admin_commands
from cluster.cli import build_parser, main
from cluster.console import print_table, progress
from cluster.launcher import LocalCluster, LocalClusterRecord
from cluster.requests import RequestState, RequestStatus, SubmitRequest, TeamUsage


def test_user_text_that_looks_like_markup_is_printed_as_written(tmp_path, capsys):
    spec = tmp_path / "markup.yaml"
    spec.write_text(
        'name: "x[/]"\n'
        "pools:\n"
        '  - {name: "[bold]cpu", accelerator: cpu, node: {cpus: 8, memory: 32Gi}, nodes: {max: 8}}\n'
    )
    assert main(["spec", "validate", str(spec), "--kind", "cluster"]) == 1
    out = capsys.readouterr().out
    assert "name: 'x[/]' is not a valid name" in out
    assert "pools[0].name: '[bold]cpu' is not a valid name" in out
    missing = tmp_path / "[red]:thumbs_up:.yaml"
    assert main(["submit", str(missing)]) == 2
    assert f"error: {missing} is not a valid YAML file" in capsys.readouterr().err
    progress("[/] done")
    print_table(None, ["team"], [["[bold]research :fire:"]])
    captured = capsys.readouterr()
    assert "[/] done" in captured.err and "[bold]research :fire:" in captured.out


def write_local_cluster_record(home: Path, text: str | None = None) -> Path:
    """A `local-cluster.json` as `llmos up` writes it (or `text` instead), for the commands that read it."""
    home.mkdir(parents=True, exist_ok=True)
    path = LocalCluster.record_path(home)
    record = LocalClusterRecord(
        cluster_name="demo",
        spec={},
        head_ip="127.0.0.2",
        gcs_port=6380,
        dashboard_port=8265,
        temp_dir=str(home / "ray"),
        token_path=str(home / "auth_token"),
        object_store_bytes=2**27,
        nodes=[],
        started_at=0.0,
    )
    path.write_text(record.model_dump_json() if text is None else text)
    return path


def test_env_quotes_each_value_for_the_shell(tmp_path, capsys, monkeypatch):
    home = tmp_path / "home [x] $(touch pwned) 'it's'"
    write_local_cluster_record(home)
    monkeypatch.setenv("LLMOS_HOME", str(home))
    assert main(["env"]) == 0
    exports = dict(shlex.split(line)[1].split("=", 1) for line in capsys.readouterr().out.splitlines())
    assert exports["RAY_AUTH_TOKEN_PATH"] == str(home / "auth_token")
    assert exports["RAY_ADDRESS"] == "http://127.0.0.1:8265" and exports["RAY_AUTH_MODE"] == "token"


@pytest.mark.parametrize("text", ['{"cluster": "from another version"}', "not json", ""])
def test_a_foreign_local_cluster_record_is_named_with_the_fix(tmp_path, capsys, monkeypatch, text):
    path = write_local_cluster_record(tmp_path / "home", text)
    monkeypatch.setenv("LLMOS_HOME", str(path.parent))
    for command in (["env"], ["down"]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert f"error: {path} is not a record of a local cluster this llmos started" in err
        assert "delete the file" in err and "Traceback" not in err


def test_spec_validate_json_is_json_also_when_the_file_cannot_be_read(tmp_path, capsys):
    missing = tmp_path / "missing.yaml"
    assert main(["spec", "validate", str(missing), "--json"]) == 2
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {
        "ok": False,
        "kind": None,
        "problems": [f"{missing}: file not found; check the path"],
    }
    assert captured.err == ""
    job = Path(__file__).resolve().parents[1] / "examples" / "train.yaml"
    assert main(["spec", "validate", str(job), "--cluster", str(missing), "--json"]) == 2
    assert json.loads(capsys.readouterr().out)["problems"] == [f"{missing}: file not found; check the path"]


def test_submit_json_is_a_list_for_one_file_as_for_several(tmp_path, capsys, monkeypatch):
    class Admin:
        def submit_many(self, requests: list[SubmitRequest]) -> list[RequestStatus]:
            return [
                RequestStatus(
                    id=f"research-{index:05d}",
                    request=request,
                    priority_value=500,
                    state=RequestState.QUEUED,
                    submitted_seq=index,
                    submitted_at=0.0,
                )
                for index, request in enumerate(requests, 1)
            ]

    monkeypatch.setattr(admin_commands, "_admin", lambda args: Admin())
    request = tmp_path / "request.yaml"
    request.write_text("team: research\ngang: {name: g, bundles: [{resources: {CPU: 1}}]}\n")
    assert main(["submit", str(request), "--json"]) == 0
    (status,) = json.loads(capsys.readouterr().out)
    assert status["id"] == "research-00001" and status["state"] == "queued"
    assert main(["submit", str(request), str(request), "--json"]) == 0
    assert [status["id"] for status in json.loads(capsys.readouterr().out)] == ["research-00001", "research-00002"]


def test_quota_set_takes_the_forms_the_spec_takes_and_says_how_to_write_one(capsys, monkeypatch):
    changes = []

    class Admin:
        def set_quota(self, team: str, **quota: float | None) -> TeamUsage:
            changes.append(quota)
            return TeamUsage(team=team, quota={k: v for k, v in quota.items() if v is not None}, used={})

    monkeypatch.setattr(admin_commands, "_admin", lambda args: Admin())
    assert main(["quota", "set", "research", "memory=32Gi", "gpu=8", "cpu=-", "gpu:H100=2.5"]) == 0
    assert changes == [{"memory": 32 * 2**30, "gpu": 8.0, "cpu": None, "gpu:H100": 2.5}]
    assert capsys.readouterr().out == "research: quota memory=32Gi, gpu=8, gpu:H100=2.5\n"
    for item, expected in (
        ("gpu=abc", "'gpu=abc': 'abc' is not a number; write KEY=NUMBER, e.g. gpu=8, or gpu=- to remove the limit"),
        ("memory=lots", "'memory=lots': 'lots' is not a memory size; write KEY=NUMBER, e.g. memory=32Gi, or memory=-"),
        ("gpu", "'gpu': write KEY=NUMBER, e.g. gpu=8 or memory=32Gi, or KEY=- to remove the limit"),
    ):
        assert main(["quota", "set", "research", item]) == 2
        assert f"error: {expected}" in capsys.readouterr().err
    assert len(changes) == 1


@pytest.mark.parametrize(
    "argv",
    [
        "controller --address 10.0.0.1:6379 --json --credential-file team.cred stop",
        "controller stop --address 10.0.0.1:6379 --json --credential-file team.cred",
        "controller --address 10.0.0.1:6379 --json --credential-file team.cred status",
        "controller --address 10.0.0.1:6379 --json --credential-file team.cred start",
        "quota --address 10.0.0.1:6379 --json --credential-file team.cred set research gpu=8",
        "quota --address 10.0.0.1:6379 set research gpu=8 --json --credential-file team.cred",
        "quota --address 10.0.0.1:6379 --json --credential-file team.cred show",
    ],
)
def test_options_given_before_or_after_a_group_s_subcommand_both_count(argv):
    args = build_parser().parse_args(shlex.split(argv))
    assert (args.address, args.json, args.credential_file) == ("10.0.0.1:6379", True, "team.cred")


def test_options_a_group_s_subcommand_is_not_given_keep_their_defaults():
    args = build_parser().parse_args(["quota", "set", "research", "gpu=8"])
    assert (args.address, args.json, args.credential_file) == (None, False, None)
