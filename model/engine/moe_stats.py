"""MoE metrics gathered without stalling the engine loop.

- FLOPs: analytic, from the tokens each step serves (routed experts: 2·k·H·2I + 2·k·I·H per token and MoE layer;
  shared experts counted separately as dense). `flops_total` counts served tokens only.
- Timing (model/engine/moe_timer.py): every `timing_every`-th step is sampled. The routed-expert op (`fused_moe`)
  of each MoE block is timed by events recorded right around it: event-record nodes inside the decode CUDA graphs
  (so sampled decode steps stay graph replays), fresh events in eager steps, the wall clock on the CPU. The events
  are read once complete, never waited on. A sample's FLOPs are those of the step's tokens, which are all the rows
  fused_moe computes (a CUDA graph's padding rows route to no expert, model/layers/padding_rows.py); so
  utilization = FLOPs ÷ seconds of the same work.
- Expert load: each block's experts op accumulates its token counts on the device, in the kernel (they are free
  there); the collector only reads them: every few steps those buffers are
  copied device -> pinned host with non_blocking and an event, and harvested once the event has completed.
  Padding rows of CUDA graphs route nowhere, so the counters hold real tokens only.
"""

import threading
from collections import deque
from dataclasses import dataclass, field

import torch

from model.engine.moe_timer import MoeTimer

MAX_READY_SAMPLES = 4096  # timed samples kept for the next snapshot


@dataclass
class MoeStatsSnapshot:
    device_name: str
    flops_total: float  # routed-expert GEMM FLOPs served so far
    timed: list[tuple[float, float]]  # new since the last call: (seconds in fused_moe of a sampled step, FLOPs it
    #                                    computed there)
    expert_tokens_total: list[list[int]]  # [MoE layer][expert], cumulative
    window_expert_tokens: list[list[int]]  # [MoE layer][expert], over the recent window
    layer_indices: list[int] = field(default_factory=list)  # model layer index of each row above
    shared_expert_flops_total: float = 0.0  # dense shared-expert GEMM FLOPs served so far
    timed_skipped_total: int = 0  # sampled steps whose events were overwritten by a later replay before the read
    timing_read_host_seconds_total: float = 0.0  # host time spent reading timing events (the metric's cost)
    precision: str = ""  # what the routed experts compute in: "fp8", "bfloat16", ... ("" = unknown)


def experts_precision(blocks: list) -> str:
    """"fp8" when the experts hold float8_e4m3fn weights (model/layers/fp8.py), else their dtype's name."""
    if not blocks:
        return ""
    weight = blocks[0].experts.gate_up_proj
    return "fp8" if weight.dtype == torch.float8_e4m3fn else str(weight.dtype).removeprefix("torch.")


def routed_flops_per_token(block) -> int:
    return 2 * block.top_k * block.hidden_size * 2 * block.intermediate_size + \
        2 * block.top_k * block.intermediate_size * block.hidden_size


def shared_flops_per_token(block) -> int:
    shared = getattr(block, "shared_expert", None)
    fused = getattr(block, "fused_shared_slots", 0)  # moved into the experts op (model/layers/shared_expert_fusion)
    if shared is None and not fused:
        return 0
    inter = fused * block.intermediate_size if fused else shared.down_proj.in_features
    return 2 * block.hidden_size * 2 * inter + 2 * inter * block.hidden_size


def timed_flops_per_token(block) -> int:
    """FLOPs of one token in the block's timed experts op: the routed experts', and the shared MLP's when it runs
    inside that op."""
    fused = getattr(block, "fused_shared_slots", 0)
    return routed_flops_per_token(block) + (shared_flops_per_token(block) if fused else 0)


class MoeStatsCollector:
    def __init__(self, blocks: list, device: torch.device, enabled: bool, timing_every: int,
                 harvest_every: int = 8, window_harvests: int = 32):
        self.blocks = blocks
        self.device = device
        self.enabled = enabled and bool(blocks)
        self.timing_every = timing_every
        self.harvest_every = harvest_every
        self.device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        self.layer_indices = [b.layer_idx for b in blocks]
        self.precision = experts_precision(blocks)
        self.num_experts = [b.num_experts for b in blocks]
        self.routed_flops_per_token = sum(routed_flops_per_token(b) for b in blocks)
        self.shared_flops_per_token = sum(shared_flops_per_token(b) for b in blocks)
        self.timed_flops_per_token = sum(timed_flops_per_token(b) for b in blocks)
        self._lock = threading.Lock()  # snapshot() runs on another thread than the engine loop
        self._flops_total = 0.0
        self._shared_flops_total = 0.0
        self._step = 0
        self._ready_timed: list[tuple[float, float]] = []
        self._counts_shape = (len(blocks), max(self.num_experts, default=1))  # [L, E] (E: the widest block's)
        self._copy_in_flight = None  # (pinned host [L, E], event, final)
        # cumulative counts per harvest, after the counters at their reset (zero): the window is latest - oldest,
        # so until it is full it spans every interval since the reset (without that first entry the tokens of the
        # first harvest were outside it as soon as a second came)
        self._history: deque[torch.Tensor] = deque([self._zero_counts()], maxlen=window_harvests + 1)
        self.timer = MoeTimer(device, self.enabled)  # the model runner reports graph captures and replays to it
        self.timer.attach(blocks)

    # ---- timing -----------------------------------------------------------------------------------------------
    def should_time(self) -> bool:
        """Whether the coming step is sampled (its fused_moe time read). It runs as it would anyway: graph or eager."""
        return self.enabled and self._step % self.timing_every == self.timing_every - 1

    def begin_step(self) -> None:
        self.timer.begin_step(self.should_time())

    def end_step(self, num_tokens: int) -> None:
        """After the model's work on a step of `num_tokens` tokens was enqueued."""
        self._step += 1
        with self._lock:
            self._flops_total += float(num_tokens) * self.routed_flops_per_token
            self._shared_flops_total += float(num_tokens) * self.shared_flops_per_token
            self.timer.end_step(float(num_tokens) * self.timed_flops_per_token)
            if self.enabled and self._copy_in_flight is None and self._step % self.harvest_every == 0:
                self._issue_copy()
            self._poll()

    def drop_tokens(self, num_tokens: int) -> None:
        """Rows computed for sequences that had already finished (a stop seen only after the next step was
        launched): their tokens are dropped, so their FLOPs are not served. (The expert counters keep them: the
        kernel did route them, and which experts they took is only known on the device.)"""
        with self._lock:
            self._flops_total -= float(num_tokens) * self.routed_flops_per_token
            self._shared_flops_total -= float(num_tokens) * self.shared_flops_per_token

    def after_read_back(self, going_idle: bool) -> None:
        """After a step's sampled ids reached the host (its timing events are complete). `going_idle`: no work is
        left, so the counters are copied now and metrics are complete while no steps run."""
        with self._lock:
            if self.enabled and going_idle:
                self._issue_copy(final=True)
            self._poll()

    def _issue_copy(self, final: bool = False) -> None:
        """`final`: the engine is going idle; a snapshot may then wait for this copy (it costs the loop nothing)."""
        counts = torch.zeros(self._counts_shape, dtype=torch.int64, device=self.device)
        for i, b in enumerate(self.blocks):
            counts[i, : b.num_experts].copy_(b.experts.expert_load[: b.num_experts])  # not fused shared ones
        if self.device.type == "cuda":
            host = torch.empty(counts.shape, dtype=torch.int64, pin_memory=True)
            host.copy_(counts, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = counts, None
        self._copy_in_flight = (host, event, final)

    def _poll(self) -> None:
        """Harvest whatever finished on the device (caller holds the lock). Never waits."""
        self._ready_timed += self.timer.poll()
        del self._ready_timed[:-MAX_READY_SAMPLES]  # nobody takes snapshots (offline use): keep the newest
        if self._copy_in_flight is not None:
            host, event, final = self._copy_in_flight
            if event is not None and final and not event.query():
                event.synchronize()  # only the copy itself is left to wait for
            if event is None or event.query():
                self._copy_in_flight = None
                self._history.append(host.clone())

    # ---- reset ------------------------------------------------------------------------------------------------
    def read_counts_now(self) -> torch.Tensor:
        """Synchronous read of the device counters, for checks (the engine reads them asynchronously). [L, E]"""
        out = torch.zeros(self._counts_shape, dtype=torch.int64)
        for i, b in enumerate(self.blocks):
            out[i, : b.num_experts] = b.experts.expert_load[: b.num_experts].cpu()
        return out

    def reset_counts(self) -> None:
        """Zero the device counters in place (CUDA graphs keep pointers to them) and the host history."""
        for b in self.blocks:
            b.experts.expert_load.zero_()
        with self._lock:
            self._copy_in_flight = None
            self._history.clear()
            self._history.append(self._zero_counts())

    # ---- snapshot (any thread) --------------------------------------------------------------------------------
    def snapshot(self) -> MoeStatsSnapshot:
        with self._lock:
            self._poll()
            timed, self._ready_timed = self._ready_timed, []
            latest, oldest = self._history[-1], self._history[0]
            total, window = self._per_layer(latest), self._per_layer(latest - oldest)
            return MoeStatsSnapshot(self.device_name, self._flops_total, timed, total, window,
                                    list(self.layer_indices), self._shared_flops_total, self.timer.skipped,
                                    self.timer.read_host_seconds, self.precision)

    def _zero_counts(self) -> torch.Tensor:
        return torch.zeros(self._counts_shape, dtype=torch.int64)

    def _per_layer(self, counts: torch.Tensor) -> list[list[int]]:
        return [counts[i, :e].tolist() for i, e in enumerate(self.num_experts)]
