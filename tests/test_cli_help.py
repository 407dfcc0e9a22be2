"""What the command lines parse, before any cluster is reached. `--help` of every command: argparse
expands `%` in help texts when it prints them, so a stray percent sign ("95% intervals") turns
`--help` into a traceback that no other test reaches. Command groups that show something when given
alone, and flags refused before connecting (numbers out of range among them)."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator

import pytest

from benchmarks import serve_load
from cluster.admin import Admin
from cluster.cli import build_parser, main
from cluster.console import UserError
from jobs import train, training_loop


def every_command(
    parser: argparse.ArgumentParser, path: str = "llmos"
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, subparser in action.choices.items():
                yield from every_command(subparser, f"{path} {name}")


def test_every_llmos_command_prints_its_help():
    commands = dict(every_command(build_parser()))
    assert {"llmos quota set", "llmos bench binding", "llmos pools import"} <= commands.keys()
    for path, parser in commands.items():
        assert parser.format_help().startswith(f"usage: {path}"), path


@pytest.mark.parametrize("main", [train.main, training_loop.main, serve_load.main])
def test_every_other_entry_point_prints_its_help(main: Callable[[list[str]], int], capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith("usage: ")


def test_a_group_alone_shows_its_state():
    parser = build_parser()
    for group, shown_by in (("quota", ["quota", "show"]), ("controller", ["controller", "status"])):
        alone, explicit = parser.parse_args([group, "--json"]), parser.parse_args([*shown_by, "--json"])
        assert (alone.func, alone.json) == (explicit.func, True), group


def test_train_refuses_a_wait_timeout_that_is_no_wait_before_it_connects(capsys):
    with pytest.raises(SystemExit) as exited:
        train.main(["examples/train.yaml", "--wait-timeout", "-5"])
    assert exited.value.code == 2
    assert "--wait-timeout -5: give the seconds to wait, more than 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, refusal",
    [
        (["up", "--port", "99999"], "argument --port: '99999' is not a TCP port; give 1 to 65535"),
        (["up", "--object-store-mb", "5"], "argument --object-store-mb: 5 is too small; give 75 or more"),
        (["up", "--nodes-per-pool", "0"], "argument --nodes-per-pool: 0 is too small; give 1 or more"),
        (["submit", "a.yaml", "--wait", "-2"], "argument --wait: -2 is too small; give 0 or more"),
        (["submit", "a.yaml", "--wait", "nan"], "argument --wait: 'nan' is not a finite number"),
        (["decisions", "--limit", "ten"], "argument --limit: 'ten' is not a whole number"),
        (["serve", "deploy", "s.yaml", "--port", "0"], "argument --port: '0' is not a TCP port"),
        (["bench", "binding", "--runs", "0"], "argument --runs: 0 is too small; give 1 or more"),
        (["bench", "faults", "--http-examples", "-1"], "argument --http-examples: -1 is too small; give 0 or more"),
        (["controller", "start", "--policy", "fdg"], "argument --policy: invalid choice: 'fdg' (choose from"),
        (["bench", "binding", "--policy", "fdg"], "argument --policy: invalid choice: 'fdg' (choose from"),
    ],
)
def test_a_number_out_of_range_is_refused_naming_the_flag_and_the_range(argv: list[str], refusal: str, capsys):
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(argv)
    assert exited.value.code == 2
    assert refusal in capsys.readouterr().err


def test_a_credential_that_is_empty_or_no_text_is_refused_before_connecting(tmp_path, capsys):
    empty, binary = tmp_path / "empty", tmp_path / "binary"
    empty.write_text("  \n")
    binary.write_bytes(b"\xff\xfe")
    for path, refusal in ((empty, "is empty"), (binary, "is not a text file")):
        assert main(["queue", "--credential-file", str(path)]) == 2
        error = capsys.readouterr().err
        assert f"--credential-file: {path} {refusal}; give the file that holds the credential" in error
        assert "Traceback" not in error
    # Never taken for no credential, which would fall back to the environment's or the admin's.
    with pytest.raises(UserError, match="the credential given is empty"):
        Admin(credential="")


@pytest.mark.parametrize("variable", ["LLMOS_CREDENTIAL", "LLMOS_CREDENTIAL_FILE"])
def test_a_credential_variable_set_but_empty_is_refused_not_taken_for_the_admins(variable, monkeypatch):
    monkeypatch.setenv(variable, " ")  # as `LLMOS_CREDENTIAL=$(cat a-missing-file)` leaves it
    unconnected = Admin.__new__(Admin)  # the refusal comes before the controller is asked anything
    with pytest.raises(UserError, match=f"{variable} is set but empty"):
        unconnected._credential_from_environment()


def test_a_serve_config_that_cannot_be_written_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "a-file").touch()
    assert main(["serve", "config", "examples/serve.yaml", "-o", str(tmp_path / "a-file" / "serve.yaml")]) == 2
    error = capsys.readouterr().err
    assert f"-o {tmp_path / 'a-file' / 'serve.yaml'}: cannot write it: Not a directory" in error


def test_a_submit_interrupted_while_it_waits_names_the_requests_it_made(tmp_path, capsys, monkeypatch):
    from cluster import admin_commands
    from cluster.requests import RequestState, RequestStatus, SubmitRequest

    request = tmp_path / "request.yaml"
    request.write_text("team: research\ngang: {name: g, bundles: [{resources: {CPU: 1}}]}\n")

    class Interrupted:  # the admin API's answers, up to a Ctrl-C in the wait
        def submit_many(self, requests: list[SubmitRequest]) -> list[RequestStatus]:
            return [
                RequestStatus(
                    id="research-00007",
                    request=requests[0],
                    priority_value=500,
                    state=RequestState.QUEUED,
                    submitted_seq=7,
                    submitted_at=0.0,
                )
            ]

        def wait_many(self, request_ids: list[str], timeout_s: float) -> list[RequestStatus]:
            raise KeyboardInterrupt

    monkeypatch.setattr(admin_commands, "_admin", lambda args, start=True: Interrupted())
    assert main(["submit", str(request), "--wait", "60"]) == 130
    error = capsys.readouterr().err
    assert "submitted research-00007, not withdrawn" in error and "interrupted" in error
