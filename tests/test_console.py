"""The CLI's output helpers."""

from __future__ import annotations

from cluster.console import print_table


def test_an_empty_table_says_so_instead_of_printing_bare_headings(capsys):
    print_table(None, ["id", "state"], [], empty="no requests waiting or placed")
    print_table("Nodes", ["node"], iter(()))
    print_table(None, ["id", "state"], iter([["research-00001", "placed"]]))  # rows may be any iterable
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == ["no requests waiting or placed", "Nodes: none"]
    assert "id" in out[2] and "research-00001" in out[-1]
