"""Multi-turn load for the load generator: conversations that share a system prompt and grow turn by turn, the
traffic automatic prefix caching exists for.

Conversation c, turn t (t = 0 .. T-1) sends the token-id prompt
    system + user[c][0] + reply[c][0] + ... + user[c][t-1] + reply[c][t-1] + user[c][t]
and asks for exactly `output_len` tokens (ignore_eos). `reply[c][t]` is drawn by the client, `output_len` ids long:
a random-weight model's answer cannot be turned back into the same ids through its text, so the history carries a
stand-in of the same length. Each turn therefore re-sends the previous turn's prompt exactly (which a prefix cache
holds) followed by `output_len + user_len` new tokens; all conversations share the `system_len` tokens in front.
Turns of one conversation run one after the other; up to `max_concurrency` conversations run at once. A failed
turn ends its conversation.

Arrivals. By default a turn is sent as soon as the previous answer is complete (closed loop), so each server shapes
its own arrivals: conversations started together stay in step on a server that answers them alike (every turn a
burst), and drift apart on one whose first turn spreads them out (without prefix caching, a long prefill). With
`turn_interval_s` > 0, turn t of a conversation is sent at its start + t * turn_interval_s (or when turn t - 1 is
complete, if later: counted in `late_turns`), so two servers see the same arrivals as long as neither is late.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

import httpx

from service.loadgen.client import COMPLETIONS_PATH, LevelRun, RequestResult, send_completion
from service.loadgen.dataset import PromptSpec
from service.loadgen.report import distribution_ms, summarize


@dataclass(frozen=True)
class Conversation:
    system: list[int]
    users: list[list[int]]  # per turn
    replies: list[list[int]]  # per turn, the history's stand-in for the answer
    output_len: int

    def prompt(self, turn: int) -> list[int]:
        tokens = list(self.system)
        for t in range(turn):
            tokens += self.users[t] + self.replies[t]
        return tokens + self.users[turn]

    @property
    def num_turns(self) -> int:
        return len(self.users)


def make_conversations(num_conversations: int, num_turns: int, system_len: int, user_len: int, output_len: int,
                       vocab_size: int, seed: int = 0) -> list[Conversation]:
    if min(num_conversations, num_turns, user_len, output_len, vocab_size) < 1 or system_len < 0:
        raise ValueError(f"conversations, turns, user_len, output_len and vocab_size must be >= 1 and system_len "
                         f">= 0; got {num_conversations}, {num_turns}, {user_len}, {output_len}, {vocab_size}, "
                         f"{system_len}")
    rng = random.Random(seed)

    def ids(n: int) -> list[int]:
        return [rng.randrange(vocab_size) for _ in range(n)]

    system = ids(system_len)
    return [Conversation(system, [ids(user_len) for _ in range(num_turns)], [ids(output_len) for _ in range(num_turns)],
                         output_len) for _ in range(num_conversations)]


def max_prompt_len(conversations: list[Conversation]) -> int:
    return max(len(c.prompt(c.num_turns - 1)) for c in conversations)


@dataclass
class MultiTurnRun:
    results: list[tuple[int, RequestResult]]  # (turn, result) for every turn sent
    not_sent: int  # turns skipped because an earlier turn of their conversation failed
    duration_s: float
    max_concurrency: int | None
    late_turns: int = 0  # turns sent after their slot (turn_interval_s > 0): the previous one was not complete


async def run_conversations(base_url: str, conversations: list[Conversation], *, model: str | None,
                            api_key: str | None = None, max_concurrency: int | None = None,
                            temperature: float = 0.0, request_timeout_s: float = 600.0,
                            start_spread_s: float = 0.0, seed: int = 0, processes: int = 1,
                            turn_interval_s: float = 0.0) -> MultiTurnRun:
    """Every conversation sends its turns one after another (the next once the previous answer is complete).
    start_spread_s > 0: each conversation starts after its own uniform random delay in [0, start_spread_s) (seeded,
    so two servers see the same arrivals); 0: all start at once and, with equal lengths, stay in step.
    turn_interval_s > 0: turn t is sent t * turn_interval_s after its conversation's start, not before (module doc).
    processes > 1: the conversations are split over that many client processes (service/loadgen/processes.py)."""
    if start_spread_s < 0 or turn_interval_s < 0:
        raise ValueError(f"start_spread_s and turn_interval_s must be >= 0, got {start_spread_s} and {turn_interval_s}")
    rng = random.Random(seed)
    delays = [rng.uniform(0.0, start_spread_s) for _ in conversations]
    parts = max(1, min(processes, len(conversations), max_concurrency or len(conversations)))
    if parts > 1:
        from service.loadgen.processes import run_sharded, shard_counts

        limits = shard_counts(max_concurrency, parts) if max_concurrency else [None] * parts
        runs, duration = await run_sharded(_run_with_delays, [
            dict(base_url=base_url, conversations=conversations[i::parts], delays=delays[i::parts], model=model,
                 api_key=api_key, max_concurrency=limits[i], temperature=temperature,
                 request_timeout_s=request_timeout_s, turn_interval_s=turn_interval_s) for i in range(parts)])
        return MultiTurnRun([r for run in runs for r in run.results], sum(run.not_sent for run in runs), duration,
                            max_concurrency, sum(run.late_turns for run in runs))
    return await _run_with_delays(base_url, conversations, delays, model=model, api_key=api_key,
                                  max_concurrency=max_concurrency, temperature=temperature,
                                  request_timeout_s=request_timeout_s, turn_interval_s=turn_interval_s)


async def _run_with_delays(base_url: str, conversations: list[Conversation], delays: list[float], *,
                           model: str | None, api_key: str | None, max_concurrency: int | None,
                           temperature: float, request_timeout_s: float, turn_interval_s: float = 0.0) -> MultiTurnRun:
    url = base_url.rstrip("/") + COMPLETIONS_PATH
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limit = max_concurrency or len(conversations)
    gate = asyncio.Semaphore(limit)
    results: list[tuple[int, RequestResult]] = []
    skipped = late = 0

    async with httpx.AsyncClient(timeout=httpx.Timeout(request_timeout_s, connect=10.0),
                                 limits=httpx.Limits(max_connections=limit, max_keepalive_connections=limit)) as client:
        async def converse(conv: Conversation, delay: float) -> None:
            nonlocal skipped, late
            await asyncio.sleep(delay)
            async with gate:
                began = time.perf_counter()
                for turn in range(conv.num_turns):
                    if turn_interval_s:
                        wait = began + turn * turn_interval_s - time.perf_counter()
                        if wait > 0:
                            await asyncio.sleep(wait)
                        else:
                            late += turn > 0
                    prompt = conv.prompt(turn)
                    result = await send_completion(client, url, headers, model,
                                                   PromptSpec(prompt, len(prompt), conv.output_len), temperature)
                    results.append((turn, result))
                    if not result.ok:
                        skipped += conv.num_turns - turn - 1
                        return

        start = time.perf_counter()
        await asyncio.gather(*(converse(c, d) for c, d in zip(conversations, delays)))
        duration = time.perf_counter() - start
    return MultiTurnRun(results, skipped, duration, max_concurrency, late)


def summarize_turns(run: MultiTurnRun) -> dict:
    """The level summary of every turn together (report.summarize), plus TTFT per turn (numbered from 1)
    and over turns >= 2, the turns whose history a prefix cache can hold."""
    summary = summarize(LevelRun(run.max_concurrency, float("inf"), [r for _, r in run.results], run.not_sent,
                                 run.duration_s))
    turns = sorted({t for t, _ in run.results})
    ok = [(t, r) for t, r in run.results if r.ok]
    summary["turns"] = [{"turn": t + 1, "completed": sum(1 for u, _ in ok if u == t),
                         "mean_prompt_len": _mean([r.prompt_len for u, r in ok if u == t]),
                         "ttft_ms": distribution_ms([r.ttft_s for u, r in ok if u == t])} for t in turns]
    summary["ttft_ms_turn2plus"] = distribution_ms([r.ttft_s for t, r in ok if t >= 1])
    summary["late_turns"] = run.late_turns
    return summary


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def turns_table(summary: dict) -> str:
    lines = ["| turn | completed | mean prompt tokens | TTFT ms mean/p50/p99 |", "|---|---|---|---|"]
    for row in summary["turns"]:
        ttft, prompt = row["ttft_ms"], row["mean_prompt_len"]
        lines.append(f"| {row['turn']} | {row['completed']} | {'—' if prompt is None else f'{prompt:.0f}'} | "
                     + "/".join("—" if ttft[k] is None else f"{ttft[k]:.1f}" for k in ("mean", "p50", "p99")) + " |")
    return "\n".join(lines)
