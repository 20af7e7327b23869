"""Replies leave through a byte budget, per client connection and in total, and every reply that does
not fit is counted.

The ROUTER socket runs with ZMQ_ROUTER_MANDATORY, so a reply to a peer whose queue is at its
high-water mark, or that is gone, raises instead of vanishing. Every reply is sent zero-copy with a
MessageTracker, which says when libzmq has released it (written to the connection, or discarded with
a closed one): the bytes of replies not yet released are the bytes this process holds for its
clients. A reply that would take a connection over `per_peer_bytes`, or all of them over
`total_bytes`, is dropped before it is queued. A client that never reads therefore costs at most
`per_peer_bytes`, and all of them together at most `total_bytes`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import zmq

DROP_BUDGET = "reply_dropped_budget"  # the reply did not fit the connection's or the total byte budget
DROP_HWM = "reply_dropped_hwm"  # the connection's queue held --hwm replies already
DROP_GONE = "reply_dropped_gone"  # the client disconnected


@dataclass
class _Pending:
    tracker: zmq.MessageTracker
    nbytes: int


class Outbox:
    def __init__(self, socket: zmq.Socket, per_peer_bytes: int, total_bytes: int):
        self.socket = socket
        self.per_peer_bytes = per_peer_bytes
        self.total_bytes = total_bytes
        self.pending_bytes = 0
        self._peers: dict[bytes, deque[_Pending]] = {}
        self._peer_bytes: dict[bytes, int] = {}

    def reap(self) -> None:
        """Forget the replies libzmq has released (a connection releases its replies in order)."""
        for peer in list(self._peers):
            q = self._peers[peer]
            while q and q[0].tracker.done:
                self.pending_bytes -= q[0].nbytes
                self._peer_bytes[peer] -= q.popleft().nbytes
            if not q:
                del self._peers[peer], self._peer_bytes[peer]

    def peer_bytes(self, peer: bytes) -> int:
        return self._peer_bytes.get(peer, 0)

    def send(self, route: list[bytes], parts: list[bytes]) -> str | None:
        """Queue a reply; None when queued, else why it was dropped (DROP_BUDGET, DROP_HWM, DROP_GONE)."""
        peer = route[0]
        nbytes = sum(len(p) for p in route) + sum(len(p) for p in parts)
        if self.pending_bytes + nbytes > self.total_bytes or self.peer_bytes(peer) + nbytes > self.per_peer_bytes:
            self.reap()
            if self.pending_bytes + nbytes > self.total_bytes or self.peer_bytes(peer) + nbytes > self.per_peer_bytes:
                return DROP_BUDGET
        try:
            tracker = self.socket.send_multipart([*route, *parts], zmq.NOBLOCK, copy=False, track=True)
        except zmq.Again:
            return DROP_HWM
        except zmq.ZMQError as e:
            if e.errno == zmq.EHOSTUNREACH:
                return DROP_GONE
            raise
        self._peers.setdefault(peer, deque()).append(_Pending(tracker, nbytes))
        self._peer_bytes[peer] = self._peer_bytes.get(peer, 0) + nbytes
        self.pending_bytes += nbytes
        return None
