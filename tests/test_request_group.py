"""RequestGroup on the event loop: outputs in the order delivered, one per engine output; an error ends the group
after what came before it, even when the engine delivers more (a deadline fails a request the engine still runs)."""

import asyncio

import pytest

from model.engine.llm_engine import RequestOutput
from service.errors import ApiError
from service.request_group import RequestGroup


def out(rid, tokens, text, finished=False, reason=None, count=0):
    return RequestOutput(rid, tokens, text, finished, reason, 5, count)


def run(coro):
    return asyncio.run(coro)


def test_outputs_come_one_by_one_in_delivery_order():
    async def go():
        group = RequestGroup(["a", "b"], abort=lambda ids: None)
        group.deliver([(0, out("a", [11], "x", count=1))])
        group.deliver([(1, out("b", [21], "p", count=1)), (0, out("a", [12], "y", count=2))])
        group.deliver([(0, out("a", [13], "z", finished=True, reason="length", count=3))])
        taken = [await group.__anext__() for _ in range(4)]
        return group, taken

    group, taken = run(go())
    assert [(i, o.new_token_ids) for i, o in taken] == [(0, [11]), (1, [21]), (0, [12]), (0, [13])]
    assert taken[-1][1].finished and group.unfinished == {"b"}


def test_an_error_comes_after_the_outputs_before_it_and_aborts_the_rest():
    aborted = []

    async def go():
        group = RequestGroup(["a", "b"], abort=aborted.extend)
        group.deliver([(0, out("a", [1], "x", count=1))])
        group.fail(ApiError(504, "too slow", code="request_timeout"))
        group.deliver([(0, out("a", [2], "y", finished=True, reason="length", count=2))])  # the engine ran on
        taken = await group.__anext__()
        with pytest.raises(ApiError) as err:
            await group.__anext__()
        return taken, err.value

    (index, output), error = run(go())
    assert index == 0 and output.new_token_ids == [1] and not output.finished
    assert error.code == "request_timeout"
    assert sorted(aborted) == ["a", "b"]


def test_a_waiting_consumer_wakes_for_a_later_delivery():
    async def go():
        group = RequestGroup(["a"], abort=lambda ids: None)
        waiter = asyncio.ensure_future(group.__anext__())
        await asyncio.sleep(0)
        assert not waiter.done()
        group.deliver([(0, out("a", [7], "q", finished=True, reason="stop", count=1))])
        first = await asyncio.wait_for(waiter, 5)
        with pytest.raises(StopAsyncIteration):
            await group.__anext__()
        return first

    index, output = run(go())
    assert index == 0 and output.new_token_ids == [7] and output.finished
