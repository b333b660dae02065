"""Connections the dashboard cannot be starved by: a bound on open connections and a deadline for each request.

uvicorn's own limits answer 503 to requests beyond `limit_concurrency` and close idle keep-alive connections, but
a connection that never sends a request (or sends half of one) stays open forever and holds a file descriptor:
130 of them once took the last descriptors of a client whose folder camera then could not open its next image.
`guarded_protocol` closes a connection at once when `max_connections` are already open, and closes any connection
that has not delivered a whole request within `request_timeout_s` of connecting or of its last answer (a request
being answered, such as an open event stream, is never cut).
"""
from __future__ import annotations

import asyncio


def guarded_protocol(max_connections: int, request_timeout_s: float):
    """A uvicorn HTTP protocol class (h11) with those two limits."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.abort()  # refused: the descriptor is freed now, not when the peer gives up
                return
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._idle():
                self._arm()  # the next request must be complete in time too
            super().data_received(data)

        def connection_lost(self, exc) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None
            super().connection_lost(exc)

        def _idle(self) -> bool:
            """No request is being answered (none arrived yet, or the last one was answered)."""
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            if self._deadline is None:
                self._deadline = self.loop.call_later(request_timeout_s, self._expire)

        def _expire(self) -> None:
            self._deadline = None
            if self._idle() and not self.transport.is_closing():
                self.transport.abort()

    return GuardedH11Protocol
