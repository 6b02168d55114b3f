"""RequestGroup: the engine requests of one HTTP request (n choices of each prompt), seen from the event loop.

Iterate it for (choice index, RequestOutput). The iteration raises the ApiError that ended the group early: the
engine failed or stalled, the server drained past its deadline, the request outlived --request-timeout (a timer,
not a wait per token, so the deadline costs nothing while tokens flow), or a choice ended with an error (its
constraints left no valid token: finish_reason "error"; a 400 naming why, since its output so far does not satisfy
them, and the other choices are aborted).
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

from service.errors import ApiError


class RequestGroup:
    def __init__(self, request_ids: list[str], abort: Callable[[list[str]], None], timeout_s: float | None = None):
        self.request_ids = request_ids
        self.unfinished = set(request_ids)
        self.queue: asyncio.Queue = asyncio.Queue()
        self._abort = abort
        self.ended: asyncio.Future = asyncio.get_running_loop().create_future()  # the error that ended it early
        self._deadline = None
        if timeout_s:
            self._deadline = asyncio.get_running_loop().call_later(timeout_s, self.fail, ApiError(
                504, f"The request did not finish within the server's limit of {timeout_s:g} s (--request-timeout)",
                code="request_timeout"))

    def deliver(self, items: list) -> None:  # on the event loop
        for item in items:
            self.queue.put_nowait(item)

    def fail(self, error: ApiError) -> None:
        """End the group with `error` (on the event loop); a no-op once every choice finished."""
        if self.unfinished:
            self.queue.put_nowait(error)
            if not self.ended.done():
                self.ended.set_result(error)

    def __aiter__(self):
        return self

    async def __anext__(self) -> tuple[int, Any]:
        if not self.unfinished:
            raise StopAsyncIteration
        item = await self.queue.get()
        if isinstance(item, BaseException):
            self.abort()
            raise item
        index, output = item
        if output.finished and output.finish_reason == "error":
            self.abort()
            code, message = output.error or ("structured_output_failed", "The output could not continue")
            raise ApiError(400, message, code=code)
        if output.finished:
            self.unfinished.discard(self.request_ids[index])
            if not self.unfinished:
                self._stop_deadline()
        return index, output

    def abort(self) -> None:
        """Cancel what is still running (client gone, or ended early); the engine frees the KV blocks."""
        self._stop_deadline()
        if self.unfinished:
            self._abort(list(self.unfinished))
            self.unfinished.clear()

    def _stop_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
