"""RequestGroup on the event loop: outputs a consumer has not taken yet merge (one chunk for several tokens), in
order, with errors after what came before them."""

import asyncio

import pytest

from model.engine.llm_engine import RequestOutput, merge_outputs
from model.engine.logprobs import TokenLogprobs
from service.errors import ApiError
from service.request_group import RequestGroup


def out(rid, tokens, text, finished=False, reason=None, count=0, logprobs=None, prompt_logprobs=None):
    return RequestOutput(rid, tokens, text, finished, reason, 5, count, None, logprobs, prompt_logprobs)


def lp(token):
    return TokenLogprobs(token, -0.5 * token, 1, [(token, -0.5 * token)])


def run(coro):
    return asyncio.run(coro)


def test_outputs_not_taken_yet_merge_into_one():
    async def go():
        group = RequestGroup(["a", "b"], abort=lambda ids: None)
        group.deliver([(0, out("a", [11], "x", count=1, logprobs=[lp(11)], prompt_logprobs=[None, lp(3)]))])
        group.deliver([(1, out("b", [21], "p", count=1)), (0, out("a", [12], "y", count=2, logprobs=[lp(12)]))])
        group.deliver([(0, out("a", [13], "z", finished=True, reason="length", count=3, logprobs=[lp(13)]))])
        taken = [await group.__anext__(), await group.__anext__()]
        return group, taken

    group, taken = run(go())
    (i0, a), (i1, b) = taken
    assert (i0, i1) == (0, 1)  # in the order the choices first had something to take
    assert a.new_token_ids == [11, 12, 13] and a.new_text == "xyz"
    assert a.finished and a.finish_reason == "length" and a.num_output_tokens == 3
    assert [t.token_id for t in a.logprobs] == [11, 12, 13]
    assert a.prompt_logprobs[1].token_id == 3  # the first output's prompt logprobs kept
    assert b.new_token_ids == [21] and not b.finished
    assert group.unfinished == {"b"}


def test_a_taken_output_is_not_merged_into():
    async def go():
        group = RequestGroup(["a"], abort=lambda ids: None)
        group.deliver([(0, out("a", [1], "x", count=1))])
        first = await group.__anext__()
        group.deliver([(0, out("a", [2], "y", finished=True, reason="stop", count=2))])
        second = await group.__anext__()
        with pytest.raises(StopAsyncIteration):
            await group.__anext__()
        return first, second

    (_, first), (_, second) = run(go())
    assert first.new_token_ids == [1] and not first.finished
    assert second.new_token_ids == [2] and second.finish_reason == "stop"


def test_logprobs_absent_on_both_stay_absent():
    merged = merge_outputs([out("a", [1], "x"), out("a", [2], "y")])
    assert merged.logprobs is None and merged.prompt_logprobs is None and merged.new_token_ids == [1, 2]


def test_an_error_comes_after_the_outputs_before_it_and_aborts_the_rest():
    aborted = []

    async def go():
        group = RequestGroup(["a", "b"], abort=aborted.extend)
        group.deliver([(0, out("a", [1], "x", count=1))])
        group.fail(ApiError(500, "engine failed", code="engine_error"))
        taken = await group.__anext__()
        with pytest.raises(ApiError) as err:
            await group.__anext__()
        return taken, err.value

    (index, output), error = run(go())
    assert index == 0 and output.new_token_ids == [1]
    assert error.code == "engine_error"
    assert sorted(aborted) == ["a", "b"]


def test_a_waiting_consumer_wakes_for_a_later_delivery():
    async def go():
        group = RequestGroup(["a"], abort=lambda ids: None)
        waiter = asyncio.ensure_future(group.__anext__())
        await asyncio.sleep(0)
        assert not waiter.done()
        group.deliver([(0, out("a", [7], "q", finished=True, reason="stop", count=1))])
        return await asyncio.wait_for(waiter, 5)

    index, output = run(go())
    assert index == 0 and output.new_token_ids == [7] and output.finished


def test_outputs_after_a_failure_are_dropped_and_the_error_still_raised():
    """A deadline (504) fails the group while the engine still runs the request: what the engine makes afterwards,
    even the output that finishes it, must not reach the client ahead of (or instead of) the error."""
    async def go():
        group = RequestGroup(["a"], abort=lambda ids: None)
        group.deliver([(0, out("a", [1], "x", count=1))])
        group.fail(ApiError(504, "too slow", code="request_timeout"))
        group.deliver([(0, out("a", [2], "y", finished=True, reason="length", count=2))])
        taken = await group.__anext__()
        with pytest.raises(ApiError) as err:
            await group.__anext__()
        return taken, err.value

    (index, output), error = run(go())
    assert output.new_token_ids == [1] and not output.finished
    assert error.code == "request_timeout"
