"""strategies.exchange: a round trip whose hooks run while the clients work (a grid stand-in, no runtime)."""

from __future__ import annotations

from types import SimpleNamespace

from strategies.exchange import exchange


class ScriptedGrid:
    """Replies to pushed messages a few at a time, one batch per pull (as clients finishing in waves)."""

    def __init__(self, batches: list[int]) -> None:
        self.batches, self.pushed, self.pulls = list(batches), [], 0

    def push_messages(self, messages):
        self.pushed = [f"m{i}" for i, _ in enumerate(messages)]
        return list(self.pushed)

    def pull_messages(self, ids):
        self.pulls += 1
        size = self.batches.pop(0) if self.batches else 0
        ready = [i for i in self.pushed if i in ids][:size]
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i), name=f"reply to {i}") for i in ready]


def test_exchange_runs_meanwhile_first_and_hands_over_each_reply_as_it_is_pulled():
    grid, events = ScriptedGrid([0, 2, 0, 1, 1]), []
    replies = exchange(grid, ["a", "b", "c", "d"], timeout=30, meanwhile=lambda: events.append("meanwhile"),
                       on_reply=lambda reply: events.append((reply.name, grid.pulls)))
    assert events == ["meanwhile", ("reply to m0", 2), ("reply to m1", 2), ("reply to m2", 4), ("reply to m3", 5)]
    assert [r.name for r in replies] == ["reply to m0", "reply to m1", "reply to m2", "reply to m3"]
    assert grid.pulls == 5  # it stops pulling once every reply is in


def test_exchange_returns_what_came_before_the_timeout():
    grid = ScriptedGrid([1])  # one reply, then silence
    replies = exchange(grid, ["a", "b"], timeout=0.3)
    assert [r.name for r in replies] == ["reply to m0"]
