"""Per-request timestamps → vLLM-style request metrics (TTFT, inter-token latency, queue time, e2e, tokens).

Runs on the engine thread only. Times are `time.monotonic()`; a request arrives when the HTTP handler admits it.
The engine reports no "scheduled" timestamp, so queue time is measured up to the start of the first engine step
whose outputs name the request (with chunked prefill of a long prompt that includes its earlier prefill chunks).
"""

from __future__ import annotations

from dataclasses import dataclass

from service.metrics import ServiceMetrics


@dataclass
class _Timeline:
    arrival: float
    first_seen_step_start: float | None = None
    last_token: float | None = None
    prompt_tokens_counted: bool = False


class RequestTiming:
    def __init__(self, metrics: ServiceMetrics):
        self.metrics = metrics
        self._timelines: dict[str, _Timeline] = {}

    def on_added(self, request_id: str, arrival: float) -> None:
        self._timelines[request_id] = _Timeline(arrival)

    def on_output(self, output, step_start: float, step_end: float) -> None:
        timeline = self._timelines.get(output.request_id)
        if timeline is None:
            return
        m = self.metrics
        if timeline.first_seen_step_start is None:
            timeline.first_seen_step_start = step_start
            m.queue_time.observe(max(0.0, step_start - timeline.arrival))
        if output.new_token_ids:
            if not timeline.prompt_tokens_counted:
                m.prompt_tokens.inc(output.num_prompt_tokens)
                timeline.prompt_tokens_counted = True
            if timeline.last_token is None:
                m.ttft.observe(step_end - timeline.arrival)
            else:
                m.inter_token.observe(step_end - timeline.last_token)
            timeline.last_token = step_end
            m.generation_tokens.inc(len(output.new_token_ids))
        if output.finished:
            del self._timelines[output.request_id]
            reason = output.finish_reason or "stop"
            if not timeline.prompt_tokens_counted and reason != "abort":  # prefilled, then ended with no token
                m.prompt_tokens.inc(output.num_prompt_tokens)  # (an "error" choice): its prefill was processed
            if reason in m.request_success:
                m.request_success[reason].inc()
            m.e2e.observe(step_end - timeline.arrival)
            m.request_prompt_tokens.observe(output.num_prompt_tokens)
            m.request_generation_tokens.observe(output.num_output_tokens)

    def forget(self, request_id: str) -> None:
        self._timelines.pop(request_id, None)

    def on_aborted(self, request_id: str) -> None:
        """A request cancelled before it finished (client gone): counted as finished_reason="abort"."""
        if self._timelines.pop(request_id, None) is not None:
            self.metrics.request_success["abort"].inc()
