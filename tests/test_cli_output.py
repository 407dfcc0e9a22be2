"""What the `llmos` CLI prints for people (the JSON it prints is the models' own)."""

from __future__ import annotations

import time

from cluster.admin_commands import request_facts
from cluster.console import print_table
from cluster.requests import RequestState, RequestStatus, SubmitRequest


def test_an_empty_table_says_so_instead_of_printing_bare_headings(capsys):
    print_table(None, ["id", "state"], [], empty="no requests waiting or placed")
    print_table("Nodes", ["node"], iter(()))
    print_table(None, ["id", "state"], iter([["research-00001", "placed"]]))  # rows may be any iterable
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == ["no requests waiting or placed", "Nodes: none"]
    assert "id" in out[2] and "research-00001" in out[-1]


def test_a_request_in_full_says_who_what_when_and_its_group():
    request = SubmitRequest.model_validate(
        {
            "team": "research",
            "kind": "training",
            "priority": "high",
            "gang": {"name": "pretrain", "bundles": [{"resources": {"CPU": 2, "GPU": 4}}] * 2},
        }
    )
    submitted = time.mktime((2026, 12, 7, 9, 0, 0, 0, 0, -1))
    status = RequestStatus(
        id="research-00007", request=request, priority_value=1000, state=RequestState.QUEUED,
        submitted_seq=7, submitted_at=submitted,
    )  # fmt: skip
    assert request_facts(status, now=submitted + 42) == [
        "team research, training, priority high (1000)",
        "gang pretrain: 2 bundles, same_pool, group_bundles per_bundle",
        "submitted 2026-12-07 09:00:00, waiting 42s",
    ]
    status.state, status.placed_at = RequestState.RUNNING, submitted + 1.5
    status.placement_group = "llmos-research-00007"
    assert request_facts(status, now=submitted + 60)[2:] == [
        "submitted 2026-12-07 09:00:00, placed 2026-12-07 09:00:01 (1.5s later)",
        "Ray placement group llmos-research-00007 (namespace llmos)",
    ]
    status.state, status.placement_group, status.preemptions = RequestState.PREEMPTED, None, 1
    assert request_facts(status, now=submitted + 90)[2:] == [
        "submitted 2026-12-07 09:00:00, last placed 2026-12-07 09:00:01",
        "taken off its nodes: preempted or drained 1 time(s), by a node leaving 0 time(s)",
    ]
