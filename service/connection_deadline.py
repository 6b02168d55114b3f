"""A deadline for a request's headers, at the connection level (uvicorn has none for a connection's first request:
a client that connects and sends nothing, or half a header, holds the connection forever).

The HTTP protocol class uvicorn would pick ("auto") is extended: when a connection opens, and again after each
response, a timer starts; if no new request's headers are complete when it fires, the connection is closed (with a
408 when part of a request had arrived). The request guard then bounds the body (service/request_guard.py), so
every byte a client owes has a deadline.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.auto import AutoHTTPProtocol

from service.errors import error_bytes


def header_deadline_protocol(read_timeout_s: float) -> type[asyncio.Protocol]:
    body = error_bytes(408, f"The request headers did not arrive within {read_timeout_s:g} s (--read-timeout)",
                       "read_timeout")
    timeout_response = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                        b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)

    class HeaderDeadlineProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._partial_request = False
            self._arm_header_deadline()

        def data_received(self, data: bytes) -> None:
            self._partial_request = True
            super().data_received(data)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._partial_request = False
            self._arm_header_deadline()

        def _arm_header_deadline(self) -> None:
            self.loop.call_later(read_timeout_s, self._header_deadline, self.cycle)

        def _header_deadline(self, cycle_then) -> None:
            if self.cycle is not cycle_then or self.transport.is_closing():
                return  # a request's headers arrived meanwhile (its body has the request guard's deadline)
            if self._partial_request:
                self.transport.write(timeout_response)
            self.transport.close()

    return HeaderDeadlineProtocol
