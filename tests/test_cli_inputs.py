"""What the `llmos` CLI does with odd input: text that looks like markup, paths with spaces, files it did
not write, and the forms of a value the spec itself accepts. None of it needs a cluster."""

from __future__ import annotations

from cluster.cli import main
from cluster.console import print_table, progress


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
