"""What the command lines parse, before any cluster is reached. `--help` of every command: argparse
expands `%` in help texts when it prints them, so a stray percent sign ("95% intervals") turns
`--help` into a traceback that no other test reaches. Command groups that show something when given
alone, and flags refused before connecting (numbers out of range among them)."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator

import pytest

from benchmarks import serve_load
from cluster.cli import build_parser
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
    ],
)
def test_a_number_out_of_range_is_refused_naming_the_flag_and_the_range(argv: list[str], refusal: str, capsys):
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(argv)
    assert exited.value.code == 2
    assert refusal in capsys.readouterr().err
