"""ModelRunner: owns the paged KV cache, turns a scheduled step into a ForwardBatch, runs the model (on the GPU a
captured CUDA graph for decode steps, piecewise graphs around eager attention for steps that prefill, eager beyond
their largest bucket) and returns the logits of the rows that sample.

Block PAD_BLOCK of the cache is reserved for padding (model/engine/decode_inputs.py): slot 0 holds exactly the
padding token's K/V, so a padded CUDA-graph row reads finite values and never touches a real sequence's cache.
Padding rows route to no expert (model/layers/padding_rows.py): in a decode graph they are the rows that write no
K/V (slot -1), in the piecewise graphs those past the step's real rows. With sliding-window layers the cache
has several KV-cache groups (model/kv_groups.py): blocks 0..G-1 are reserved, block g being group g's padding block,
each group has its own block tables and slots, and the cache tensor's first dimension is storage slots, not layers.

A step is described once, as what every rank of a parallel model needs to run it: eager steps as `StepItem`s (per
sequence its new tokens, first position, block table and how many of its last rows' logits are wanted: 1 for the
row that samples, more for prompt logprobs), graph steps as `DecodeInputs`.
`step_listener` receives that description before the step runs here; `run_items` and `replay_encoded` run it on
another rank.
"""

import logging
import time
from dataclasses import dataclass

import torch

from model.engine.block_manager import BlockManager, blocks_for
from model.engine.config import EngineConfig
from model.engine.decode_inputs import PAD_TOKEN, DecodeInputs, static_decode_batch
from model.engine.graph_capture import GraphCapture
from model.engine import step_pieces
from model.engine.penalties import PenaltyState
from model.engine.piecewise_graphs import PiecewiseGraphs
from model.engine.step_pieces import PieceBuffers
from model.engine.sampler import Sampler, SamplingExtras
from model.engine.sampling_params import MAX_LOGPROBS, SamplingParams
from model.engine.scheduler import SchedulerOutput
from model.forward_batch import ForwardBatch
from model.kv_capacity import values_per_token_per_layer
from model.kv_groups import KvCacheGroups, max_sequence_tokens, null_block
from model.layers import fusion
from model.layers.padding_rows import padding_rows

logger = logging.getLogger(__name__)

StepItem = tuple[list[int], int, list[list[int]], int]  # (new token ids, first position, block table of each
#   KV-cache group, logit rows)
GRAPH_CONTEXT_TOKENS = 1 << 18  # largest batch × padded context a decode graph is captured for (bounds its memory)
MIN_GRAPH_WIDTH = 8  # smallest block-table width bucket of the decode graphs


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    sizes = [1 << i for i in range(max(1, max_num_seqs).bit_length()) if (1 << i) < max_num_seqs]
    return sizes + [max_num_seqs]


def graph_widths(max_blocks: int) -> list[int]:
    widths = [1 << i for i in range(MIN_GRAPH_WIDTH.bit_length() - 1, max_blocks.bit_length()) if (1 << i) < max_blocks]
    return widths + [max_blocks]


@dataclass
class _Graph:
    graph: "torch.cuda.CUDAGraph"
    batch: ForwardBatch  # views of the static input buffers
    logits: torch.Tensor  # [b, V] static output
    int64_inputs: torch.Tensor  # [(2+G)b]: input_ids, positions, each group's slot_mapping (views)
    int32_inputs: torch.Tensor  # [b + G*b*w]: context_lens, block tables of each KV-cache group
    staging: DecodeInputs | None = None  # host side of the two input buffers, made at the first replay
    # The same step captured again with the MoE timer's event-record nodes, replayed only in steps sampled for
    # timing, since event nodes slow every replay (benchmarks/NOTES.md, "Metrics overhead"). It writes its logits
    # into `logits` too. None: `graph` serves every step.
    timed: "torch.cuda.CUDAGraph | None" = None


def _host(values, dtype, pin: bool) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, pin_memory=pin)


class ModelRunner:
    def __init__(self, model, config: EngineConfig, device: torch.device, dtype: torch.dtype):
        self.model = model
        self.config = config
        self.device = device
        self.dtype = dtype
        self.block_size = config.block_size
        self.pin = device.type == "cuda"
        fusion.set_enabled(not config.enforce_eager)  # eager means no compiled code either, as in vLLM
        mc = model.config
        self.kv_groups = KvCacheGroups.of(mc)
        self.num_groups = self.kv_groups.num_groups
        self.bytes_per_block = model.kv_cache_bytes_per_block(self.block_size, dtype)  # one id: every storage slot
        max_len = mc.max_position_embeddings if config.max_model_len is None else config.max_model_len
        if config.max_model_len is not None and config.max_model_len > mc.max_position_embeddings:
            raise ValueError(f"max_model_len={config.max_model_len} exceeds the model's max_position_embeddings="
                             f"{mc.max_position_embeddings}")
        self._activation_peak = 0  # bytes of the largest step's temporaries, measured by the memory profile
        # the piecewise graphs' static buffers exist before the KV cache is sized, so that it leaves room for them
        self._piece_buffers = None
        if self.wants_piecewise_graphs():
            with torch.inference_mode():
                self._piece_buffers = PieceBuffers.allocate(model, self._piecewise_max_rows(), device, dtype)
        self.num_usable_blocks = self._decide_num_blocks(max_len)
        if hasattr(model, "agree_on_num_blocks"):  # the ranks of a parallel model (model/parallel) take the least
            self.num_usable_blocks = model.agree_on_num_blocks(self.num_usable_blocks)
        # Called with (graph key, DecodeInputs) or (None, [StepItem]) before each step runs: rank 0 of a parallel
        # model tells its workers (model/parallel) to run the same step. None on a single rank.
        self.step_listener = None
        self.moe_timer = None  # model/engine/moe_timer.MoeTimer: told of each graph's capture and replay
        # the longest sequence whose blocks (a sliding group's only its window's) fit the whole cache; chunks of one
        # token bound it: the scheduler shrinks a prefill chunk to the blocks that are free, so a sequence alone
        # always progresses with its window's blocks + 1 (a whole batch of chunk would refuse lengths that fit)
        capacity = max_sequence_tokens(self.kv_groups, self.num_usable_blocks, self.block_size, 1,
                                       max(max_len, config.max_model_len or 0))
        if config.max_model_len is not None and config.max_model_len > capacity:
            raise ValueError(f"max_model_len={config.max_model_len} does not fit the KV cache "
                             f"({self.num_usable_blocks} blocks × {self.block_size} = {capacity} tokens of one "
                             f"sequence)")
        self.max_model_len = min(max_len, capacity)
        logger.info("KV cache: %d blocks of %d tokens (%.2f GiB), max_model_len %d", self.num_usable_blocks,
                    self.block_size, (self.num_usable_blocks + self.num_groups) * self.bytes_per_block / 2**30,
                    self.max_model_len)
        if self.num_groups > 1 or self.kv_groups.windows[0] is not None:
            logger.info("KV-cache groups (windows %s): %d storage slots for %d layers; blocks behind a sliding "
                        "window are released", self.kv_groups.windows, self.kv_groups.num_slots, mc.num_layers)
        if mc.mla is not None:  # the capacity the latent cache buys (model/kv_capacity.py)
            layout = getattr(model, "layout", None)  # a tensor-parallel rank's (model/parallel)
            cached, uncompressed = values_per_token_per_layer(mc, layout.world if layout is not None else 1)
            pool = self.num_usable_blocks * self.block_size
            logger.info("MLA latent KV cache: %d values per token per layer instead of %d: %d tokens where "
                        "decompressed keys and values would hold %d", cached, uncompressed, pool,
                        pool * cached // uncompressed)
        self.max_blocks_per_seq = blocks_for(self.max_model_len, self.block_size)
        self.kv_cache = torch.zeros(model.kv_cache_shape(self.num_usable_blocks + self.num_groups, self.block_size),
                                    dtype=dtype, device=device)
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.block_manager: BlockManager | None = None  # set by the engine; decode replays read its tables
        self.graph_batch_sizes: list[int] = []
        self.graph_widths: list[int] = []
        self.pieces: PiecewiseGraphs | None = None  # piecewise graphs of steps that prefill, once captured

    # ---- KV cache sizing --------------------------------------------------------------------------------------
    def _decide_num_blocks(self, max_len: int) -> int:
        cfg = self.config
        if cfg.num_kv_blocks is not None:
            return cfg.num_kv_blocks
        if self.device.type != "cuda":
            return max(self.num_groups * blocks_for(min(max_len, 8192), self.block_size),
                       cfg.cpu_kv_cache_bytes // self.bytes_per_block)
        free, total = self._profile_peak_free_memory(max_len)
        budget = int(total * cfg.gpu_memory_utilization) - (total - free) - self._graph_reserve_bytes()
        num = budget // self.bytes_per_block - self.num_groups  # less the groups' padding blocks
        if num < 1:
            raise RuntimeError(f"no GPU memory left for the KV cache: {free / 2**30:.1f} GiB free of "
                               f"{total / 2**30:.1f} GiB after the weights and a {cfg.max_num_batched_tokens}-token "
                               f"step; lower max_num_batched_tokens or raise gpu_memory_utilization")
        return num

    @torch.inference_mode()
    def _profile_peak_free_memory(self, max_len: int) -> tuple[int, int]:
        """Run the largest prefill step (and sampling of max_num_seqs rows) once; returns (free memory at the peak
        of that step, total memory)."""
        cfg = self.config
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        tokens = cfg.max_num_batched_tokens
        seq_len = max(1, min(max_len, tokens))
        lens = [seq_len] * (tokens // seq_len) + ([tokens % seq_len] if tokens % seq_len else [])
        lens = lens[: cfg.max_num_seqs]
        tables, next_block = [], 1
        for n in lens:
            tables.append(list(range(next_block, next_block + blocks_for(n, self.block_size))))
            next_block += len(tables[-1])
        cache = torch.zeros(self.model.kv_cache_shape(next_block, self.block_size), dtype=self.dtype,
                            device=self.device)
        cache_bytes = cache.numel() * cache.element_size()
        vocab = self.model.config.vocab_size
        batch = self.build_batch([([i % vocab for i in range(n)], 0, [table] * self.num_groups, 1)
                                  for n, table in zip(lens, tables)])
        self.model(batch, cache)
        sampling_peak(self.device, cfg.max_num_seqs, vocab)
        torch.cuda.synchronize(self.device)
        activation_peak = torch.cuda.max_memory_allocated(self.device) - before - cache_bytes
        self._activation_peak = max(0, activation_peak)
        del cache, batch
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        return free - max(0, activation_peak), total

    def _graph_reserve_bytes(self) -> int:
        if self.config.enforce_eager:
            return 0
        mc = self.model.config
        gathered_kv = 4 * GRAPH_CONTEXT_TOKENS * mc.num_kv_heads * mc.head_dim * self.dtype.itemsize
        logits = 2 * self.config.max_num_seqs * mc.vocab_size * 4
        pieces = 0
        if self.wants_piecewise_graphs():  # their pool holds a step's temporaries at the largest bucket, for good
            tokens = self.config.max_num_batched_tokens
            pieces = int(self._activation_peak * min(1.0, fusion.EAGER_MIN_ROWS / tokens))
        return gathered_kv + logits + pieces + (256 << 20)

    # ---- batches ----------------------------------------------------------------------------------------------
    def build_batch(self, items: list[StepItem]) -> ForwardBatch:
        bs, num_groups = self.block_size, self.num_groups
        input_ids, positions, qsl, ctx, qlens, logits_idx = [], [], [0], [], [], []
        slots = [[] for _ in range(num_groups)]  # per group [N]
        tables = [[] for _ in range(num_groups)]  # per group [B, width]
        width = max(len(group_tables[0]) for _, _, group_tables, _ in items)
        for tokens, start, group_tables, logit_rows in items:
            n = len(tokens)
            input_ids += tokens
            positions += range(start, start + n)
            for g, table in enumerate(group_tables):
                slots[g] += [table[p // bs] * bs + p % bs for p in range(start, start + n)]
                tables[g].append(table + [0] * (width - len(table)))
            qsl.append(qsl[-1] + n)
            ctx.append(start + n)
            qlens.append(n)
            logits_idx += range(qsl[-1] - logit_rows, qsl[-1])
        is_decode = all(q == 1 for q in qlens) and len(logits_idx) == len(items)
        return self._to_device(input_ids, positions, slots, tables, ctx, qsl, logits_idx, is_decode, qlens)

    def _to_device(self, input_ids, positions, slots, tables, ctx, qsl, logits_idx, is_decode, qlens) -> ForwardBatch:
        """`slots`, `tables`: one list per KV-cache group."""
        dev, pin = self.device, self.pin

        def put(values, dtype):
            return _host(values, dtype, pin).to(dev, non_blocking=True)

        group_slots = [put(s, torch.int64) for s in slots]
        group_tables = [put(t, torch.int32) for t in tables]
        return ForwardBatch(
            input_ids=put(input_ids, torch.int64), positions=put(positions, torch.int64),
            slot_mapping=group_slots[0], block_tables=group_tables[0],
            context_lens=put(ctx, torch.int32), query_start_loc=put(qsl, torch.int32),
            logits_indices=put(logits_idx, torch.int64), is_decode=is_decode,
            query_lens_host=list(qlens), context_lens_host=list(ctx),
            group_block_tables=tuple(group_tables[1:]), group_slot_mappings=tuple(group_slots[1:]),
        )


    # ---- execution --------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, force_eager: bool = False,
                sampled_before: torch.Tensor | None = None) -> torch.Tensor:
        """Returns logits [S, V] float32 of the wanted rows in scheduled order: per sequence its prompt-logprob
        rows (`prompt_logit_rows`), then its sampling row.
        `sampled_before`: the device tensor of token ids sampled by the previous step, which sequences whose last
        token is still a placeholder (asynchronous scheduling) are fed from."""
        if out.is_decode and not force_eager and self.graphs:
            key = self._graph_key(len(out.scheduled), max(len(s.seq.block_table) for s in out.scheduled))
            if key is not None:
                if self.moe_timer is not None:
                    self.moe_timer.graph_replayed(key)
                return self._replay(self.graphs[key], out, sampled_before)
        items = step_items(out)
        if self.step_listener is not None:
            self.step_listener(None, items)
        batch = self.build_batch(items)
        self._feed_sampled(batch.input_ids, out, sampled_before, decode_rows=False)
        if self.pieces is not None and not force_eager and self.pieces.bucket(batch.num_tokens) is not None:
            return self.pieces.run(batch, self.kv_cache)
        return self.model(batch, self.kv_cache)

    def _feed_sampled(self, input_ids: torch.Tensor, out: SchedulerOutput, sampled: torch.Tensor | None,
                      decode_rows: bool) -> None:
        """Overwrite the placeholder ids of sequences whose last token is still on the device with that token:
        input_ids[row] = sampled[seq.pending_row], on the device. `decode_rows`: one row per scheduled sequence
        (a decode batch); else each sequence's rows start at the sum of the earlier ones' new tokens."""
        rows, sources, row = [], [], 0
        for s in out.scheduled:
            if s.seq.num_pending:
                rows.append(row)
                sources.append(s.seq.pending_row)
            row += 1 if decode_rows else s.num_new_tokens
        if not rows:
            return
        if sampled is None:
            raise RuntimeError("a scheduled sequence's last token is still in flight, but no sampled ids were given")
        n = len(rows)
        if rows == sources and rows[-1] == n - 1:  # the same sequences in the same order: one slice copy
            input_ids[:n].copy_(sampled[:n])
        else:
            index = _host(rows + sources, torch.int64, self.pin).to(self.device, non_blocking=True)
            input_ids.index_copy_(0, index[:n], sampled.index_select(0, index[n:]))

    def _graph_key(self, batch: int, width: int) -> tuple[int, int] | None:
        b = next((x for x in self.graph_batch_sizes if x >= batch), None)
        w = next((x for x in self.graph_widths if x >= width), None)
        key = (b, w)
        return key if key in self.graphs else None

    def _staging(self, g: _Graph) -> DecodeInputs:
        if g.staging is None:
            width = g.batch.block_tables.shape[1]
            g.staging = DecodeInputs(g.int64_inputs, g.int32_inputs, width, self.block_size, self.pin,
                                     self.num_groups)
        return g.staging

    def _replay(self, g: _Graph, out: SchedulerOutput, sampled_before: torch.Tensor | None = None) -> torch.Tensor:
        """Fill the graph's pinned host staging buffers in place (block tables: one gather of the block manager's
        rows), tell the listener, copy each buffer to the device with one copy, replay."""
        inputs = self._staging(g)
        seqs = [s.seq for s in out.scheduled]
        inputs.fill([seq.token_ids[-1] for seq in seqs], [len(seq.token_ids) - 1 for seq in seqs],
                    self.block_manager.group_tables[:, [seq.block_row for seq in seqs], : inputs.width])  # [G, n, w]
        if self.step_listener is not None:
            self.step_listener(tuple(g.batch.block_tables.shape), inputs)
        inputs.copy_to_device()
        self._feed_sampled(g.batch.input_ids, out, sampled_before, decode_rows=True)
        timed = g.timed is not None and self.moe_timer is not None and self.moe_timer.sampling
        (g.timed if timed else g.graph).replay()
        return g.logits[: len(seqs)]

    # ---- the same steps on another rank of a parallel model ---------------------------------------------------
    @torch.inference_mode()
    def run_items(self, items: list[StepItem]) -> None:
        self.model(self.build_batch(items), self.kv_cache)

    @torch.inference_mode()
    def replay_encoded(self, key: tuple[int, int], encoded) -> None:
        """Replay graph `key` on the real rows of DecodeInputs.encode() (rank 0's inputs of the same step)."""
        inputs = self._staging(self.graphs[key])
        inputs.fill_encoded(encoded)
        inputs.copy_to_device()
        self.graphs[key].graph.replay()

    def _pad_batch(self, b: int, w: int, write_slot: bool = False) -> ForwardBatch:
        """b padding rows (see module doc); `write_slot` makes row 0 write its K/V to the first slot of each group's
        padding block (start-up only)."""
        pad_blocks = [null_block(g) for g in range(self.num_groups)]  # group 0's is PAD_BLOCK
        slots = [[-1] * b for _ in pad_blocks]
        if write_slot:
            for g, block in enumerate(pad_blocks):
                slots[g][0] = block * self.block_size
        return self._to_device([PAD_TOKEN] * b, [0] * b, slots, [[[block] * w] * b for block in pad_blocks],
                               [1] * b, list(range(b + 1)), list(range(b)), True, [1] * b)

    def _pad_mixed_batch(self) -> ForwardBatch:
        """A start-up step that both decodes and prefills padding: one decode row, then a 2-token prompt at positions
        0 and 1, all reading their groups' padding blocks and writing no K/V of their own (slots -1: the plan then
        rewrites the padding token's K/V into slot 0, as every padding row does)."""
        pad_blocks = [null_block(g) for g in range(self.num_groups)]
        width = blocks_for(2, self.block_size)
        return self._to_device([PAD_TOKEN] * 3, [0, 0, 1], [[-1] * 3 for _ in pad_blocks],
                               [[[block] * width] * 2 for block in pad_blocks], [1, 2], [0, 1, 3], [0, 2], False,
                               [1, 2])

    @torch.inference_mode()
    def write_pad_kv(self) -> None:
        """Fill slot 0 with the K/V of the padding token (one eager step of one padding row)."""
        self.model(self._pad_batch(1, 1, write_slot=True), self.kv_cache)

    @torch.inference_mode()
    def capture_cuda_graphs(self) -> None:
        if self.device.type != "cuda" or self.config.enforce_eager:
            return
        sizes = graph_batch_sizes(self.config.max_num_seqs)
        widths = graph_widths(self.max_blocks_per_seq)
        keys = [(b, w) for b in sizes for w in widths
                if b * w * self.block_size <= max(GRAPH_CONTEXT_TOKENS, self.block_size * w)]
        capturer = GraphCapture(self.device)
        started = time.perf_counter()
        for b, w in sorted(keys, key=lambda k: k[0] * k[1], reverse=True):  # largest first: the pool fits the rest
            batch, int64_inputs, int32_inputs = static_decode_batch(b, w, self.device, self.num_groups)
            try:
                with fusion.for_graph_capture():
                    self.graph_forward(batch)  # warm-up outside the graph (lazy inits, compiling)
                    with capturer.after_warm_up():
                        graph, logits = capturer.capture(lambda: self.graph_forward(batch))
                        timed = None
                        if self.moe_timer is not None and self.moe_timer.enabled:  # timing events: graph nodes
                            self.moe_timer.begin_capture((b, w))
                            try:  # the same static logits: two variants of one step share one output buffer
                                timed, _ = capturer.capture(lambda: logits.copy_(self.graph_forward(batch)))
                            finally:
                                self.moe_timer.end_capture()
            except RuntimeError as err:
                raise RuntimeError(f"CUDA graph capture of the decode step (batch {b}, {w} blocks) failed: {err}; "
                                   "enforce_eager=True serves without graphs") from err
            self.graphs[(b, w)] = _Graph(graph, batch, logits, int64_inputs, int32_inputs, timed=timed)
        torch.cuda.synchronize(self.device)
        logger.info("captured %d decode CUDA graphs (batch sizes %s, block-table widths %s) in %.1f s",
                    len(self.graphs), sizes, widths, time.perf_counter() - started)
        self.graph_batch_sizes = sizes
        self.graph_widths = widths

    def graph_forward(self, batch: ForwardBatch) -> torch.Tensor:
        """What a decode CUDA graph captures: the model on `batch` with its padding rows (those writing no K/V,
        slot -1) routed to no expert. The mask is computed in the graph, from the slots each replay stages (one
        compare, and one masked_fill per MoE block); a one-row graph never pads, so it skips them."""
        if batch.num_tokens == 1:
            return self.model(batch, self.kv_cache)
        with padding_rows(batch.slot_mapping < 0):
            return self.model(batch, self.kv_cache)

    def wants_piecewise_graphs(self) -> bool:
        """Whether this runner captures piecewise graphs: on CUDA, graphs allowed, a model with pieces, one rank
        (and not when fusion.EAGER_MIN_ROWS is 0, as tests that force the fused kernels everywhere set it: no step
        would run in a bucket)."""
        return (self.device.type == "cuda" and not self.config.enforce_eager and self.config.piecewise_graphs
                and step_pieces.supported(self.model) and self._piecewise_max_rows() > 0)

    @torch.inference_mode()
    def capture_piecewise_graphs(self) -> None:
        """Capture the pieces of steps up to fusion.EAGER_MIN_ROWS rows (on the CPU they are recorded as plain
        calls, which the tests use). If capture fails, `pieces` stays None (logged): the engine serves as without them."""
        pieces = None
        try:
            pieces = PiecewiseGraphs(self.model, self.device, self.dtype, self._piecewise_max_rows(), self.moe_timer,
                                     self._piece_buffers)
            pieces.capture()
            # The eager attention between the pieces (its KV-cache write) compiles here, not in a user's first
            # prefill: with the decode path's fused norm/rotary/write, no start-up step ran that kernel (session 22's
            # engine runs logged `_write_rows_kernel` compiled after start-up). It rewrites the padding slot; the
            # engine resets the expert counters after this. The CPU compiles nothing.
            # A mixed step (a padding decode row and a 2-token padding prompt) compiles the prefill attention and
            # the decode attention over gathered rows: with --num-kv-blocks no memory-profiling step ran them, and
            # the H100 logged `_paged_prefill_kernel` compiled in a user's first prefill (2026-12-08).
            if self.device.type == "cuda":
                pieces.run(self._pad_batch(1, 1, write_slot=True), self.kv_cache)
                pieces.run(self._pad_mixed_batch(), self.kv_cache)
        except Exception as err:  # noqa: BLE001 (Triton's build errors too) the decode graphs were captured: serve
            # with them and prefill eagerly, with the memory the pieces held given back
            logger.error("CUDA graph capture of the piecewise step pieces failed (%r); steps that prefill run "
                         "eagerly", err)
            pieces = None  # drops its graphs and pool
            self._piece_buffers = None
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
                torch.cuda.empty_cache()
            return
        self.pieces = pieces

    def _piecewise_max_rows(self) -> int:
        return min(fusion.EAGER_MIN_ROWS, self.config.max_num_batched_tokens)

    @property
    def num_graphs(self) -> int:
        return len(self.graphs)

    def kv_cache_bytes(self) -> int:
        return self.kv_cache.numel() * self.kv_cache.element_size()


def sampling_peak(device: torch.device, rows: int, vocab: int) -> None:
    """Sample `rows` rows with the sampler's most memory-hungry features at once (top-k/p, min_p, logprobs, penalty
    tables for every row), so the memory profile leaves room for them."""
    logits = torch.randn(rows, vocab, device=device)
    penalties = PenaltyState(vocab, device, rows)
    state_rows = [penalties.acquire([], []) for _ in range(rows)]
    params = SamplingParams(top_p=0.9, top_k=50, min_p=0.05, logprobs=MAX_LOGPROBS, frequency_penalty=0.1)
    Sampler(device, penalties=penalties).sample(logits, [params] * rows, [None] * rows,
                                                SamplingExtras(penalty_rows=state_rows))


def prompt_logit_rows(seq, start: int, num_new_tokens: int) -> int:
    """Rows of a chunk [start, start + n) whose logits give prompt logprobs not computed yet: positions p with
    seq.prompt_logprob_positions <= p < prompt length - 1 (position p predicts token p + 1). They are always the
    chunk's last rows, or its last but the sampling row: once a sequence samples, its prompt positions are done."""
    if seq.params.prompt_logprobs is None:
        return 0
    low = max(start, seq.prompt_logprob_positions)
    high = min(start + num_new_tokens, seq.num_prompt_tokens - 1)
    return max(0, high - low)


def step_items(out: SchedulerOutput) -> list[StepItem]:
    """What each scheduled sequence feeds the model in this step."""
    items = []
    for s in out.scheduled:
        seq = s.seq
        start = seq.num_computed_tokens
        rows = prompt_logit_rows(seq, start, s.num_new_tokens) + int(s.samples)
        items.append((seq.token_ids[start : start + s.num_new_tokens], start, seq.block_tables, rows))
    return items
