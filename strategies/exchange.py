"""One round trip with the clients: Flower's ``Grid.send_and_receive`` with two hooks for server work.

    replies = exchange(grid, messages, timeout, meanwhile=warm_up, on_reply=screen)

* ``meanwhile()`` runs once, right after the messages are pushed, while the clients work: server work
  that does not need their replies (e.g. the tutor's own validation AP);
* ``on_reply(reply)`` runs on each reply as it arrives (e.g. evaluating a delta's candidate tutor while
  other clients still train).

Without hooks this is ``send_and_receive``: push, then pull until every reply is in or ``timeout``
seconds have passed; replies come back in arrival order. Both hooks run in the ServerApp's thread
between pulls, so a reply that arrives meanwhile simply waits to be pulled.

``PackedGrid(grid)`` is the grid every method runs on: it packs each ArrayRecord it pushes into one
array and unpacks the replies (``protocol.transport``; the ClientApp's mod does the other side).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from flwr.app import Message
from flwr.serverapp import Grid

from protocol.transport import packed, unpacked

PULL_INTERVAL_S = 0.1  # as Flower's in-memory grid


def exchange(grid: Grid, messages: Iterable[Message], timeout: float,
             meanwhile: Callable[[], None] | None = None,
             on_reply: Callable[[Message], None] | None = None) -> list[Message]:
    """Pushes ``messages``, runs ``meanwhile``, then pulls replies until all are in or ``timeout``
    (seconds from the push) has passed, calling ``on_reply`` on each; returns the replies."""
    end = time.monotonic() + timeout
    waiting = set(grid.push_messages(messages))
    if meanwhile is not None:
        meanwhile()
    replies: list[Message] = []
    while waiting and time.monotonic() < end:
        pulled = list(grid.pull_messages(waiting))
        waiting.difference_update(reply.metadata.reply_to_message_id for reply in pulled)
        replies.extend(pulled)
        for reply in pulled:
            if on_reply is not None:
                on_reply(reply)
        if waiting and not pulled:
            time.sleep(PULL_INTERVAL_S)
    return replies


class PackedGrid:
    """A grid that packs every message it pushes and unpacks every reply it pulls
    (``protocol.transport``); anything else is the wrapped grid's."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)  # alive while the memo is: it is keyed by the records' ids
        memo: dict = {}  # a record several messages share (the tutor, the server's edge) is packed once
        return self._grid.push_messages([packed(message, memo) for message in messages])

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [unpacked(message) for message in self._grid.pull_messages(message_ids)]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        return exchange(self, messages, float("inf") if timeout is None else timeout)

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


def packed_grid(grid: Grid) -> Grid:
    return grid if isinstance(grid, PackedGrid) else PackedGrid(grid)
