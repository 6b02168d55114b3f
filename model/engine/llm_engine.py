"""LLMEngine: requests in, tokens out, one continuous-batching step at a time.

Thread model: none of its own. The engine is called from one thread only (the service's engine thread,
service/engine_client.py, owns it and queues the HTTP side's commands); add_request / abort_request act between
steps at once, so an abort frees its blocks immediately.

Asynchronous scheduling (`EngineConfig.async_scheduling`, as in vLLM and SGLang's overlap scheduler): step N+1 is
scheduled and launched before the token ids that step N samples are read back, so the GPU never waits for the
host between steps. Until the read, each sampling sequence ends in a placeholder token (`Sequence.num_pending`);
step N+1 feeds it from step N's sampled ids on the device. Stop conditions known in advance (max_tokens,
max_model_len) are applied at launch; a sequence that samples EOS, a stop token or a stop string in step N was
already scheduled in step N+1, whose token for it is dropped. Steps of a model sharded over ranks (whose workers
need the ids on the host) are read back at once. A step with a sequence whose next sample depends on its previous
tokens on the host (a grammar, a multi-token bad word) launches its forward pass first, then reads the previous
step back and fills its grammar masks (on llguidance's threads) while the device runs the model, then samples.
Steps whose MoE time is sampled for the metrics are not: their
timing events are read, without waiting, once the step's ids are back (model/engine/moe_timer.py).
"""

import logging
from dataclasses import dataclass

import torch

from model.engine.block_manager import BlockManager
from model.engine.config import EngineConfig
from model.engine.detokenizer import IncrementalDetokenizer, check_stop_token, detokenize_and_check_stop_strings
from model.engine.decode_inputs import PAD_BLOCK
from model.engine.logprobs import LogprobsMode, LogprobsTensors, TokenLogprobs
from model.engine.model_runner import ModelRunner, prompt_logit_rows
from model.engine.moe_stats import MoeStatsCollector, MoeStatsSnapshot
from model.engine.sampler import Sampler
from model.engine.sampling_params import SamplingParams
from model.engine.sampling_state import SequenceSampling
from model.engine.scheduler import Scheduler
from model.engine.sequence import Sequence, SequenceStatus
from model.decoder import MoeCausalLM
from model.kernels import jit_monitor
from model.layers import shared_expert_fusion

logger = logging.getLogger(__name__)


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None  # None | "stop" | "length" | "abort" | "error"
    num_prompt_tokens: int
    num_output_tokens: int
    stop_reason: str | int | None = None  # the stop string or stop token id; None for EOS and length
    logprobs: list[TokenLogprobs] | None = None  # one per new token, when params.logprobs is set
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # with a request's first output (None: 1st token)
    error: tuple[str, str] | None = None  # (code, message) with finish_reason "error": no valid next token (its
    # constraints allowed none, or its grammar failed); the output so far does not satisfy them


def _to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """int64 indices to the device without waiting for the stream (pinned staging on CUDA)."""
    return torch.tensor(values, dtype=torch.int64, pin_memory=device.type == "cuda").to(device, non_blocking=True)


@dataclass
class _PromptRows:
    """The prompt-logprob rows a step computed: per sequence (sequence, number of rows), their results."""
    owners: list[tuple[Sequence, int]]
    targets: list[int]  # the prompt token each row predicts
    ks: list[int]
    host: LogprobsTensors


@dataclass
class _LaunchedStep:
    """A step whose work is enqueued on the device and whose sampled token ids are not read yet."""
    pending: list[tuple[Sequence, int]]  # (sequence, index of its placeholder token) per sampled row
    sampled_ids: torch.Tensor  # [S] on the device: the next step may feed its sequences from it
    host_ids: torch.Tensor  # [S] host copy, complete once `copied` has (pinned, non-blocking on CUDA)
    copied: "torch.cuda.Event | None"
    logprobs: LogprobsTensors | None = None  # host copies (behind `copied` too) of the sampled rows' logprobs
    prompt: _PromptRows | None = None
    no_token: torch.Tensor | None = None  # [S] bool host copy (behind `copied`): the row had no allowed token


@dataclass
class _Forward:
    """A step's forward pass, enqueued: its logits and which rows are whose."""
    sched: object
    logits: torch.Tensor  # [R, V]
    sample_rows: list[int]  # row of each sampling sequence, in scheduled order
    prompt_owners: list[tuple[Sequence, int, int]]  # (sequence, first row, rows) of prompt-logprob rows


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # 0-1
    num_preemptions_total: int
    prefix_cache_queries_total: int = 0  # prompt tokens looked up in the prefix cache (first admissions)
    prefix_cache_hits_total: int = 0  # of those, tokens found cached


class LLMEngine:
    def __init__(self, config: EngineConfig, model=None, tokenizer=None, workers=None):
        """`model`/`tokenizer` may be passed in ready-made (tests, or rank 0's shard of a parallel model); otherwise
        `config.model` is loaded. `workers`: the other ranks of a parallel model, which follow each step
        (`send_step`), report a dead rank (`check`) and stop (`close`); see model/parallel/launcher.py."""
        from model.kernels import extension
        from model.loader import load_model

        self.config = config
        self.device = config.resolve_device()
        self.dtype = config.resolve_dtype(self.device)
        self.workers = workers
        jit_monitor.pause()  # this start-up's compiles are expected; start() below re-arms the monitor
        if model is None:
            model, tokenizer = load_model(config.model, random_weights=config.random_weights, dtype=self.dtype,
                                          device=self.device, quantization=config.quantization)
        if shared_expert_fusion.enabled() and workers is None and type(model) is MoeCausalLM:  # one rank only
            shared_expert_fusion.fuse_shared_experts(model)  # before the memory profile and the graph captures
        self.model = model
        self.tokenizer = tokenizer
        self.model_config = model.config
        self.kernel_path = extension.describe()
        self.eos_token_ids = list(dict.fromkeys([*self.model_config.eos_token_ids,
                                                 *getattr(tokenizer, "eos_token_ids", [])]))

        self.runner = ModelRunner(model, config, self.device, self.dtype)
        self.max_model_len = self.runner.max_model_len
        if self.max_model_len < 2:  # a request is at least one prompt token and one output token
            raise ValueError(
                f"max_model_len={self.max_model_len}: no request fits (one needs at least 2 tokens); the KV cache has "
                f"{self.runner.num_usable_blocks} blocks of {config.block_size} tokens over "
                f"{self.runner.num_groups} KV-cache group(s), each token needing a block in every group: raise "
                f"num_kv_blocks (or the memory for the KV cache) or max_model_len")
        # ids below first_block: the KV-cache groups' padding blocks (group 0's is PAD_BLOCK), model/kv_groups.py
        self.block_manager = BlockManager(self.runner.num_usable_blocks, config.block_size,
                                          first_block=PAD_BLOCK + self.runner.num_groups,
                                          windows=self.runner.kv_groups.windows,
                                          max_seqs=config.max_num_seqs,
                                          max_blocks_per_seq=self.runner.max_blocks_per_seq,
                                          prefix_caching=config.enable_prefix_caching,
                                          model_key=f"{config.model}|{config.random_weights}|{self.dtype}".encode())
        self.runner.block_manager = self.block_manager
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   prefill_hold_steps=config.prefill_hold_steps)
        self.sampling = SequenceSampling(self.model_config.vocab_size, self.device, config.max_num_seqs,
                                         self.eos_token_ids)
        self.sampler = Sampler(self.device, seed=config.seed, logprobs_mode=LogprobsMode(config.logprobs_mode),
                               penalties=self.sampling.penalties)
        self.moe = MoeStatsCollector(model.moe_blocks(), self.device, config.expert_metrics, config.moe_timing_every)
        self.runner.moe_timer = self.moe.timer  # decode graphs get fused_moe timing events (before their capture)

        self.moe.reset_counts()  # the memory-profiling step was counted
        self.runner.write_pad_kv()
        self.runner.capture_cuda_graphs()
        if self.runner.wants_piecewise_graphs():
            self.runner.capture_piecewise_graphs()
        self.moe.reset_counts()
        if self.device.type == "cuda":
            jit_monitor.start()  # from here on, a Triton kernel specialised by a step is logged (its step waited)
        if self.workers is not None:  # from now on every step is sent to the workers before it runs here
            self.runner.step_listener = self.workers.send_step

        self._active_ids: set[str] = set()  # added and not yet finished
        self._abort_outputs: list[RequestOutput] = []
        # (sequence, token, its output count, its logprobs) to emit; token None: the sequence ended with seq.error
        self._pending: list[tuple[Sequence, int | None, int, object]] = []
        self._in_flight: _LaunchedStep | None = None  # launched, its sampled ids not read yet
        self.async_scheduling = config.async_scheduling and self.workers is None
        self._arrivals = 0

    # ---- requests (between steps) -----------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams | None = None, *,
                    prompt_checked: bool = False) -> None:
        """`prompt_checked`: the caller has already checked that every prompt id is an int in [0, vocab_size) (the
        service does, at its HTTP boundary), so the engine thread skips that pass over the prompt."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
        prompt = list(prompt_token_ids)
        if not prompt:
            raise ValueError("the prompt must have at least one token")
        vocab = self.model_config.vocab_size
        # in C over the list (set/min/max): the per-token Python check cost ~3 µs a token on the engine thread, 0.2 s
        # for a burst of 64 prompts of 3k tokens; a failure is found again token by token for the message. Even so
        # ~0.25 ms for 2.4k tokens, 16 ms of a burst of 64 during which no step runs: skipped when checked before
        if not prompt_checked and (set(map(type, prompt)) != {int} or min(prompt) < 0 or max(prompt) >= vocab):
            bad = next(t for t in prompt if type(t) is not int or not 0 <= t < vocab)
            raise ValueError(f"prompt token {bad!r} is not a valid id in [0, {vocab})")
        for name, ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", params.logit_bias),
                          ("allowed_token_ids", params.allowed_token_ids or []),
                          ("bad_words", [t for w in params.bad_words_token_ids for t in w])):
            bad = next((t for t in ids if t >= vocab), None)
            if bad is not None and name != "stop_token_ids":
                raise ValueError(f"{name}: token id {bad} is not in [0, {vocab})")
        if len(prompt) + params.max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                             f"max_model_len={self.max_model_len}")
        if request_id in self._active_ids:
            raise ValueError(f"request_id {request_id!r} is already in use")
        generator = self.sampler.new_request_generator(params.seed) if params.seed is not None else None
        seq = Sequence(request_id, prompt, params, self._arrivals, generator)
        seq.detokenizer = IncrementalDetokenizer(self.tokenizer, prompt, params.stop, params.skip_special_tokens,
                                                 params.include_stop_str_in_output)
        self.sampling.on_add(seq)
        self._arrivals += 1
        self._active_ids.add(request_id)
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> None:
        """Free the request's blocks now; its final output (finish_reason "abort") comes with the next step()."""
        if request_id not in self._active_ids:
            return
        seq = self.scheduler.abort(request_id)
        if seq is not None:
            self._release(seq)
            self._abort_outputs.append(RequestOutput(request_id, [], "", True, "abort", seq.num_prompt_tokens,
                                                     seq.num_emitted_tokens, None))

    def has_unfinished_requests(self) -> bool:
        if self.workers is not None:
            self.workers.check()  # a dead rank fails the engine loop (polled while idle too) instead of a hang
        if self._abort_outputs or self._pending or self._in_flight is not None:
            return True
        return self.scheduler.has_unfinished()

    def _release(self, seq: Sequence) -> None:
        self._active_ids.discard(seq.request_id)
        self.sampling.release(seq)

    # ---- the loop (engine thread) -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One step. Stop conditions on token ids apply as soon as a step's sampled ids are read; detokenization
        and stop strings run while this step's work is on the device, so step() returns the outputs of the step
        before it (and of aborts). A stop found that late (any stop, with asynchronous scheduling; a stop string
        otherwise) leaves the sequence scheduled in this step too: that one extra token is dropped."""
        outputs, self._abort_outputs = self._abort_outputs, []
        sched = self.scheduler.schedule()
        previous, self._in_flight = self._in_flight, None
        launched = None
        if not sched.is_empty:
            forward = self._forward(sched, previous)
            if previous is not None and any(s.samples and s.seq.params.needs_previous_tokens
                                            for s in sched.scheduled):
                self._read_back(previous)  # masks and bad words need those tokens; the device runs the forward
                previous = None
            launched = self._sample(forward)
        if previous is not None:
            self._read_back(previous)  # its ids are ready or nearly: this step was queued behind it
        outputs += self._emit_pending()  # host work overlapping the device
        if launched is not None:
            if not self.async_scheduling:
                self._read_back(launched)  # the step's one host sync
            else:
                self._in_flight = launched
        return outputs

    def _forward(self, sched, previous: _LaunchedStep | None) -> _Forward:
        """Enqueue the step's forward pass; note which logit rows sample and which give prompt logprobs."""
        self.moe.begin_step()  # a sampled step is timed as it runs (graph replay or eager), never made eager
        fed_from = None if previous is None else previous.sampled_ids
        logits = self.runner.execute(sched, sampled_before=fed_from)
        sample_rows, prompt_owners, row = [], [], 0
        for s in sched.scheduled:
            seq = s.seq
            count = prompt_logit_rows(seq, seq.num_computed_tokens, s.num_new_tokens)
            if count:
                prompt_owners.append((seq, row, count))
                seq.prompt_logprob_positions = max(seq.num_computed_tokens, seq.prompt_logprob_positions) + count
                row += count
            if s.samples:
                sample_rows.append(row)
                row += 1
        return _Forward(sched, logits, sample_rows, prompt_owners)

    def _sample(self, fwd: _Forward) -> _LaunchedStep:
        """Enqueue the sampling of the step's sampling rows; advance the sequences past it with placeholders."""
        sched = fwd.sched
        sampling = [s.seq for s in sched.scheduled if s.samples]
        logits = fwd.logits
        if fwd.prompt_owners:
            logits = logits.index_select(0, _to_device(fwd.sample_rows, logits.device))
        extras = self.sampling.extras(sampling)  # grammar masks are filled here, while the forward runs
        result = self.sampler.sample(logits, [seq.params for seq in sampling], [seq.generator for seq in sampling],
                                     extras)
        sampled_ids = result.sampled_ids  # [S] on the device
        prompt = self._prompt_logprobs(fwd) if fwd.prompt_owners else None
        host_ids, copied, host_logprobs, no_token = sampled_ids, None, result.logprobs, result.no_token
        if sampled_ids.is_cuda:
            host_ids = torch.empty(sampled_ids.shape, dtype=sampled_ids.dtype, pin_memory=True)
            host_ids.copy_(sampled_ids, non_blocking=True)
            if no_token is not None:
                no_token = torch.empty(no_token.shape, dtype=no_token.dtype, pin_memory=True).copy_(
                    result.no_token, non_blocking=True)
            host_logprobs = None if result.logprobs is None else result.logprobs.to_host()
            if prompt is not None:
                prompt.host = prompt.host.to_host()
            copied = torch.cuda.Event()
            copied.record()
        pending = self.scheduler.advance(sched)
        for row, (seq, index) in enumerate(pending):
            seq.pending_row = row
            if seq.status is SequenceStatus.FINISHED:  # stopped by the read-back before this sample: no token
                del seq.token_ids[index:]
                continue
            if index + 1 - seq.num_prompt_tokens >= seq.params.max_tokens or index + 1 >= self.max_model_len:
                seq.final_in_flight = True  # not scheduled again: this token ends it whatever it is
        self.moe.end_step(sched.num_tokens)
        return _LaunchedStep(pending, sampled_ids, host_ids, copied, host_logprobs, prompt, no_token)

    def _prompt_logprobs(self, fwd: _Forward) -> _PromptRows:
        """Raw logprobs of the prompt tokens predicted by the step's prompt rows, on the device."""
        rows, targets, ks = [], [], []
        for seq, first, count in fwd.prompt_owners:
            position = seq.prompt_logprob_positions - count  # the first position these rows predict from
            rows += range(first, first + count)
            targets += seq.token_ids[position + 1 : position + 1 + count]
            ks += [seq.params.prompt_logprobs] * count
        dev = fwd.logits.device
        logprobs = torch.log_softmax(fwd.logits.index_select(0, _to_device(rows, dev)).float(), dim=-1)
        tensors = LogprobsTensors.compute(logprobs, _to_device(targets, dev), max(ks))
        return _PromptRows([(seq, count) for seq, _, count in fwd.prompt_owners], targets, ks, tensors)

    def _read_back(self, step: _LaunchedStep) -> None:
        """Wait for the step's sampled ids, put them in place of the placeholders and apply the stop conditions
        on token ids; the tokens are emitted (detokenized) by the next _emit_pending."""
        if step.copied is not None:
            step.copied.synchronize()
        sampled = step.host_ids.tolist()
        if step.prompt is not None:
            results = step.prompt.host.rows(step.prompt.targets, step.prompt.ks)
            at = 0
            for seq, count in step.prompt.owners:
                seq.prompt_logprobs += results[at : at + count]
                at += count
        row_logprobs = None
        if step.logprobs is not None:
            row_logprobs = step.logprobs.rows(sampled, [seq.params.logprobs for seq, _ in step.pending])
        got = self.scheduler.resolve(step.pending, sampled)
        if step.no_token is not None:  # rows whose constraints allowed no token: their sample is not one
            dead = {id(step.pending[row][0]) for row in step.no_token.nonzero().flatten().tolist()}
            for seq, index in got:
                if id(seq) in dead:
                    seq.error = ("no_allowed_token", f"No token satisfies the request's constraints at output token "
                                 f"{index + 1 - seq.num_prompt_tokens} (allowed_token_ids, bad_words, min_tokens "
                                 f"and the structured output exclude every token)")
        complete = self.sampling.advance_grammars([(seq, seq.token_ids[index]) for seq, index in got
                                                   if seq.matcher is not None and seq.error is None])
        if len(got) < len(step.pending):
            self.moe.drop_tokens(len(step.pending) - len(got))
        rows = {id(seq): row for row, (seq, _) in enumerate(step.pending)} if row_logprobs is not None else None
        for seq, index in got:
            token = seq.token_ids[index]
            if seq.error is not None:  # the token is not output: the sequence ends here, with its error
                del seq.token_ids[index:]
                self.scheduler.finish(seq, "error")
                self.sampling.release(seq)
                self._pending.append((seq, None, index - seq.num_prompt_tokens, None))
                continue
            grammar_done = seq in complete
            check_stop_token(seq, token, self.eos_token_ids, self.max_model_len, num_tokens=index + 1)
            if grammar_done and seq.finish_reason is None:  # complete: this token is text, then it stops; but an
                # EOS the grammar ended with (not a stop above only because of ignore_eos) ends it as a stop token
                seq.finish_reason, seq.stop_reason = "stop", None
                seq.stopped_after_text = token not in self.eos_token_ids
            if seq.finish_reason is not None:
                del seq.token_ids[index + 1 :]  # a placeholder for a token sampled past the end
                self.scheduler.finish(seq, seq.finish_reason)  # frees its blocks before the next schedule
                self.sampling.release(seq)  # and its penalty row: the next step may admit a sequence that needs one
            token_logprobs = None if row_logprobs is None else row_logprobs[rows[id(seq)]]
            self._pending.append((seq, token, index + 1 - seq.num_prompt_tokens, token_logprobs))
        # going idle: copy the expert counters now, so metrics are complete while no steps run
        self.moe.after_read_back(going_idle=not self.scheduler.has_unfinished())

    def _emit_pending(self) -> list[RequestOutput]:
        pending, self._pending = self._pending, []
        outputs = []
        for seq, token, num_output_tokens, token_logprobs in pending:
            if seq.finish_reason == "abort":
                continue  # its final output is already out
            if token is None:  # ended by seq.error: no token, and no more text (what was held back is dropped)
                outputs.append(RequestOutput(seq.request_id, [], "", True, "error", seq.num_prompt_tokens,
                                             num_output_tokens, None, error=seq.error))
                self._release(seq)
                continue
            detokenize_and_check_stop_strings(seq, token, num_output_tokens)
            finished = seq.finish_reason is not None
            if finished and not seq.is_finished:  # a stop string: leave the scheduler now
                del seq.token_ids[seq.num_prompt_tokens + num_output_tokens :]  # tokens sampled past it
                self.scheduler.finish(seq, seq.finish_reason)
            first = seq.num_emitted_tokens == 0
            seq.num_emitted_tokens = num_output_tokens
            text = seq.detokenizer.take_new_text(finished)
            out = RequestOutput(seq.request_id, [token], text, finished, seq.finish_reason, seq.num_prompt_tokens,
                                num_output_tokens, seq.stop_reason)
            if seq.params.logprobs is not None:
                out.logprobs = [token_logprobs]
            if first and seq.params.prompt_logprobs is not None:
                out.prompt_logprobs, seq.prompt_logprobs = [None, *seq.prompt_logprobs], []
            outputs.append(out)
            if finished:
                self._release(seq)
        return outputs

    # ---- observability --------------------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        sched = self.scheduler
        return EngineStats(len(sched.running), len(sched.waiting), self.block_manager.usage,
                           sched.num_preemptions_total, sched.prefix_cache_queries_total, sched.prefix_cache_hits_total)

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix (vLLM's reset_prefix_cache: after new weights, or for cold-cache benchmarks).
        Sequences keep the blocks they hold. Returns how many blocks were cached."""
        return self.block_manager.reset_prefix_cache()

    def moe_stats(self) -> MoeStatsSnapshot:
        return self.moe.snapshot()

    @property
    def num_kv_blocks(self) -> int:
        return self.block_manager.num_blocks

    def shutdown(self) -> None:
        """Stop the worker ranks of a parallel model (also done at interpreter exit)."""
        if self.workers is not None:
            self.workers.close()
