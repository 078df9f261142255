"""MonitorState folds control messages into a snapshot; the view draws exactly that.

Pure: messages are built here, the clock is explicit.
"""

from __future__ import annotations

import json

from rich.console import Console

from fedmq.monitor.state import MAX_AGENTS, MonitorState
from fedmq.monitor.view import render, sparkline
from fedmq.wire.blobs import BlobRef
from fedmq.wire.control import (
    AgentStatus,
    AggregatorStatus,
    RecentRejection,
    RoundAnnouncement,
    RoundSummary,
    encode_control,
)
from fedmq.wire.signing import SigningKey, TrustedKeys
from fedmq.wire.topics import Topics

T0 = 1_000_000.0
FED = "line-3"
TOPICS = Topics(FED)
REF = BlobRef("0" * 64, 10, 1024)


def announcement(round_id: int, selected: list[str] | None, deadline: float) -> RoundAnnouncement:
    return RoundAnnouncement(
        federation=FED,
        aggregator="agg",
        round=round_id,
        issued_at=T0,
        deadline=deadline,
        bundle=REF,
        params=REF,
        selected=selected,
    )


def aggregator(round_id: int, **fields: object) -> AggregatorStatus:
    values: dict[str, object] = {
        "aggregator": "agg",
        "state": "collecting",
        "round": round_id,
        "ts": T0,
        "rounds": 5,
    }
    values.update(fields)
    return AggregatorStatus(**values)  # type: ignore[arg-type]


def agent(client: str, state: str, round_id: int | None = None, **fields: object) -> bytes:
    status = AgentStatus(
        client=client, state=state, round=round_id, ts=T0, heartbeat_s=10, **fields
    )  # type: ignore[arg-type]
    return encode_control(status)


def last_round(round_id: int, outcome: str = "closed") -> RoundSummary:
    return RoundSummary(
        round=round_id,
        outcome=outcome,  # type: ignore[arg-type]
        reason="target",
        duration_s=12.0,
        updates=3,
        rejected=1,
        bytes_in=3_000_000,
        bytes_out=500_000,
    )


def federation_state(
    trusted: TrustedKeys | None = None, signer: SigningKey | None = None
) -> MonitorState:
    state = MonitorState(FED, trusted=trusted)
    state.fold(
        TOPICS.round(),
        encode_control(announcement(2, ["a", "b", "c", "d", "e"], T0 + 100), signer),
        T0,
        retained=True,
    )
    status = aggregator(
        2,
        deadline=T0 + 100,
        opened_at=T0 - 20,
        received=1,
        expected=5,
        missing=["b", "c", "e"],  # d declined: the round does not wait for it
        missing_count=3,
        rejected={"malformed": 1},
        recent_rejections=[
            RecentRejection(client="e", round=2, reason="malformed", detail="not a frame")
        ],
        bytes_in=123_456,
        bytes_out=7_890,
        metrics={"eval_accuracy": 0.81, "eval_loss": 0.6, "train_loss": 0.7},
        last_round=last_round(1),
    )
    state.fold(TOPICS.aggregator_status(), encode_control(status, signer), T0, retained=True)
    state.fold(TOPICS.status("a"), agent("a", "idle", 2), T0, retained=True)
    state.fold(TOPICS.status("b"), agent("b", "training", 2, progress=0.5), T0, retained=True)
    state.fold(TOPICS.status("c"), agent("c", "offline", 1), T0, retained=True)
    state.fold(
        TOPICS.status("d"),
        agent(
            "d",
            "declined",
            2,
            declined="data_error",
            last_error="round 2: cannot read data/train.npz",
        ),
        T0,
        retained=True,
    )
    state.fold(TOPICS.status("e"), agent("e", "idle", 1), T0, retained=True)
    return state


def test_a_snapshot_sorts_agents_into_stragglers_dropouts_and_declines() -> None:
    state = federation_state()
    assert state.baseline
    snapshot = state.snapshot(T0 + 20)
    json.dumps(snapshot, allow_nan=False)  # JSON-ready
    assert snapshot["complete"] is True
    states = {a["client"]: a["state"] for a in snapshot["agents"]}
    assert states == {"a": "idle", "b": "training", "c": "offline", "d": "declined", "e": "idle"}
    assert snapshot["stragglers"] == ["b", "e"]
    assert snapshot["dropouts"] == ["c"]
    assert snapshot["declined"] == ["d"]
    counts = snapshot["counts"]
    assert (counts["received"], counts["expected"], counts["missing"]) == (1, 5, 3)
    assert counts["selected"] == 5
    assert counts["by_state"] == {"declined": 1, "idle": 2, "offline": 1, "training": 1}
    assert snapshot["aggregator"]["deadline_in_s"] == 80
    assert snapshot["aggregator"]["signature"] == "unverified"
    assert snapshot["rejections"]["by_reason"] == {"malformed": 1}
    assert snapshot["rejections"]["recent"][0]["client"] == "e"
    [point] = snapshot["history"]
    assert (point["round"], point["accuracy"], point["loss"]) == (1, 0.81, 0.6)


def test_silent_agents_show_offline_and_cleared_statuses_vanish() -> None:
    state = federation_state()
    assert state.snapshot(T0 + 29)["agents"][0]["state"] == "idle"
    late = state.snapshot(T0 + 31)  # 3 heartbeats of 10 s
    assert {a["client"]: a["silent"] for a in late["agents"]}["a"] is True
    assert late["dropouts"] == ["b", "c", "e"]
    state.fold(TOPICS.status("a"), b"", T0 + 31)  # fedmq clear
    assert "a" not in {a["client"] for a in state.snapshot(T0 + 31)["agents"]}
    # A live (not retained) status is seen when it arrives, whatever its ts says.
    state.fold(TOPICS.status("b"), agent("b", "uploading", 2), T0 + 100)
    b = next(a for a in state.snapshot(T0 + 101)["agents"] if a["client"] == "b")
    assert (b["state"], b["last_seen_s"]) == ("uploading", 1)


def test_signatures_are_verified_when_the_key_is_given() -> None:
    key = SigningKey.generate()
    state = federation_state(TrustedKeys([key.public]), signer=key)
    snapshot = state.snapshot(T0)
    assert snapshot["aggregator"]["signature"] == "verified"
    assert snapshot["round"]["signature"] == "verified"
    assert snapshot["problems"]["count"] == 0
    # Unsigned, or signed by someone else: refused, counted, nothing changes.
    forged = aggregator(2, state="finished", received=5)
    state.fold(TOPICS.aggregator_status(), encode_control(forged), T0)
    state.fold(TOPICS.aggregator_status(), encode_control(forged, SigningKey.generate()), T0)
    after = state.snapshot(T0)
    assert after["aggregator"]["state"] == "collecting"
    assert after["problems"]["count"] == 2
    assert "aggregator/status" in after["problems"]["recent"][-1]


def test_only_the_control_topics_are_read() -> None:
    assert MonitorState(FED, "plant-7/fedmq").topic_filters() == [
        f"plant-7/fedmq/{FED}/round",
        f"plant-7/fedmq/{FED}/status/+",
        f"plant-7/fedmq/{FED}/aggregator/status",
    ]


def test_garbage_is_a_problem_and_the_roster_is_bounded() -> None:
    state = MonitorState(FED)
    state.fold(TOPICS.status("x"), b"{not json", T0)
    state.fold(TOPICS.status("y"), agent("z", "idle"), T0)  # names another client
    state.fold("elsewhere/topic", b"{}", T0)
    assert state.problem_count == 2
    assert not state.agents
    for i in range(MAX_AGENTS + 5):
        state.fold(TOPICS.status(f"d{i}"), agent(f"d{i}", "online"), T0)
    assert len(state.agents) == MAX_AGENTS
    assert state.snapshot(T0)["counts"]["ignored_agents"] == 5


def test_the_trend_keeps_one_point_per_round() -> None:
    state = MonitorState(FED)
    for round_id, accuracy in ((1, 0.5), (2, 0.7), (3, 0.0)):
        outcome = "failed" if round_id == 3 else "closed"
        status = aggregator(
            round_id + 1,
            last_round=last_round(round_id, outcome),
            metrics={"eval_accuracy": accuracy} if outcome == "closed" else {"eval_accuracy": 0.7},
        )
        state.fold(TOPICS.aggregator_status(), encode_control(status), T0)
        state.fold(TOPICS.aggregator_status(), encode_control(status), T0)  # republished
    history = state.snapshot(T0)["history"]
    assert [(p["round"], p["outcome"], p["accuracy"]) for p in history] == [
        (1, "closed", 0.5),
        (2, "closed", 0.7),
        (3, "failed", None),  # a failed round's status still shows round 2's metrics
    ]
    assert sparkline([0.5, 0.7, None]) == "▁█ "


def test_the_live_view_shows_the_snapshot() -> None:
    snapshot = federation_state().snapshot(T0 + 20)
    console = Console(record=True, width=120, color_system=None)
    console.print(render(snapshot))
    text = console.export_text()
    assert f"fedmq monitor: fedmq/{FED}" in text
    assert "aggregator agg collecting  round 2/5  (unverified)" in text
    assert "deadline in 1m20s" in text
    assert "received 1 / expected 5  missing 3" in text
    assert "stragglers: b, e" in text
    assert "dropouts: c" in text
    assert "declined: d" in text
    assert "this round: in 120.6 KiB, out 7.7 KiB" in text
    assert "last round 1: closed (target) in 12s, 3 updates, 1 rejected" in text
    lines = {line.split("│")[1].strip(): line for line in text.splitlines() if line.count("│") > 3}
    assert "declined: data_error" in lines["d *"]
    assert "cannot read data/train.npz" in lines["d *"]
    assert "offline" in lines["c *"]
    assert "50%" in lines["b *"]
    assert "rejections this round: malformed 1" in text
    assert "not a frame" in text
    assert "81.00%" in text
    assert "0.6000" in text


def test_an_empty_federation_says_what_is_missing() -> None:
    state = MonitorState(FED)
    snapshot = state.snapshot(T0)
    assert snapshot["complete"] is False
    console = Console(record=True, width=100, color_system=None)
    console.print(render(snapshot))
    text = console.export_text()
    assert "no aggregator status retained" in text
    assert "waiting for the retained round and aggregator status" in text
