"""Shared helpers for the model tests: tiny random HF transformers models of each family saved as real checkpoints,
a small trained byte-level BPE tokenizer, and `PagedRunner`, which drives our model as an engine would."""

from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from model.forward_batch import ForwardBatch

# families whose experts transformers' SwiGLU experts interface takes (gpt-oss's clamped, biased experts do not)
FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "glm4_moe")
PARITY_FAMILIES = (*FAMILIES, "gpt_oss")
VOCAB = 320
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False, eos_token_id=None,
               bos_token_id=None, pad_token_id=None)
TINY_CONFIGS = {
    # One dense layer (mlp_only_layers), per-head q/k norm, renormalised top-k.
    "qwen3_moe": dict(model_type="qwen3_moe", head_dim=16, intermediate_size=48, moe_intermediate_size=32,
                      num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1]),
    # Shared expert with sigmoid gate, QKV biases, no renormalisation.
    "qwen2_moe": dict(model_type="qwen2_moe", intermediate_size=48, moe_intermediate_size=24,
                      shared_expert_intermediate_size=40, num_experts=6, num_experts_per_tok=3,
                      norm_topk_prob=False, qkv_bias=True),
    "mixtral": dict(model_type="mixtral", intermediate_size=40, num_local_experts=4, num_experts_per_tok=2),
    # Full-width q/k norm, clipping that really clips (weights are scaled up below).
    "olmoe": dict(model_type="olmoe", intermediate_size=32, num_experts=8, num_experts_per_tok=3,
                  norm_topk_prob=False, clip_qkv=2.0),
    # GLM-4.5: half the head rotates, per-head q/k norm, QKV biases, sigmoid routing with a (randomised, below)
    # correction bias over 2 groups keeping 1, scaled; 2 shared experts' worth of ungated shared MLP; layer 0 dense.
    "glm4_moe": dict(model_type="glm4_moe", head_dim=16, partial_rotary_factor=0.5, use_qk_norm=True,
                     attention_bias=True, intermediate_size=48, moe_intermediate_size=32, n_routed_experts=8,
                     num_experts_per_tok=3, n_group=2, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.5,
                     n_shared_experts=2, first_k_dense_replace=1),
    # Sinks, biases everywhere, layers sliding (window 5, shorter than the test prompts) / full / sliding, router
    # softmax over its top-3, clamped SwiGLU experts whose gate/up really clip (weights ~0.15 over H = 64).
    "gpt_oss": dict(model_type="gpt_oss", intermediate_size=32, num_local_experts=8, num_experts_per_tok=3,
                    head_dim=16, sliding_window=5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}


def hf_config(family: str, **overrides) -> transformers.PretrainedConfig:
    fields = {**_COMMON, **TINY_CONFIGS[family], **overrides}
    return transformers.AutoConfig.for_model(**fields)


@torch.no_grad()
def make_hf_model(family: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A float32 HF model with every parameter random (biases and norm scales too, so none is trivially 0 or 1)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(family, **overrides), attn_implementation="eager")
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.2 * torch.randn_like(p))
        else:
            p.normal_(0.0, 0.15)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):  # a buffer (transformers inits it to 0), saved with the weights
            b.normal_(0.0, 0.3)
    return model.eval()


def make_tokenizer_files(directory: Path) -> None:
    """A byte-level BPE trained on a few sentences, saved as transformers does (tokenizer.json + config + template)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["the quick brown fox jumps over the lazy dog", "hello world, this is a tokenizer test", "über café ✓"]
    tok.train_from_iterator(text * 5, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                                pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(directory)


def save_checkpoint(model: transformers.PreTrainedModel, directory: Path, **save_kwargs) -> Path:
    model.save_pretrained(directory, **save_kwargs)
    make_tokenizer_files(directory)
    return directory


def rewrite_safetensors(path: Path, change) -> None:
    """Load a safetensors file, let `change(tensors)` edit the dict in place, write it back: a broken checkpoint."""
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


class PagedRunner:
    """Our model driven as an engine would, with the fewest parts: each sequence owns KV blocks popped from a
    shuffled free list (so block tables are not contiguous); prefill in chunks; decode steps optionally padded.
    A model with sliding-window layers gets one table per KV-cache group (model/kv_groups.py), each of its own
    blocks, all kept (masking alone hides what is outside a window here)."""

    def __init__(self, model, num_blocks: int = 96, block_size: int = 4, seed: int = 0):
        param = next(model.parameters())
        self.model = model
        self.block_size = block_size
        self.kv_cache = torch.zeros(model.kv_cache_shape(num_blocks, block_size), dtype=param.dtype,
                                    device=param.device)
        self.free = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
        groups = getattr(model, "kv_groups", None)
        self.num_groups = 1 if groups is None else groups.num_groups
        self.seqs: dict[str, dict] = {}

    def step(self, new_tokens: dict[str, list[int]], pad_to: int = 0, all_logits: bool = False):
        """Feed each sequence its new tokens; returns {seq: logits [rows, V]} (last row, or all with all_logits)."""
        batch, wanted = self.prepare(new_tokens, pad_to, all_logits)
        return self.split(self.model(batch, self.kv_cache), wanted)

    @staticmethod
    def split(logits, wanted):
        out, start = {}, 0
        for seq_id, rows in wanted.items():
            out[seq_id] = logits[start : start + len(rows)]
            start += len(rows)
        return out

    def prepare(self, new_tokens: dict[str, list[int]], pad_to: int = 0, all_logits: bool = False,
                table_width: int = 0):
        """The ForwardBatch of one step (blocks allocated, lengths advanced) and the rows wanted per sequence."""
        device = self.kv_cache.device
        ids, positions, ctx_lens, query_lens, wanted = [], [], [], [], {}
        slots, tables = [[] for _ in range(self.num_groups)], [[] for _ in range(self.num_groups)]  # per group
        for seq_id, tokens in new_tokens.items():
            seq = self.seqs.setdefault(seq_id, {"len": 0, "blocks": [[] for _ in range(self.num_groups)]})
            start, end = seq["len"], seq["len"] + len(tokens)
            for blocks in seq["blocks"]:
                while len(blocks) * self.block_size < end:
                    blocks.append(self.free.pop())
            rows = list(range(len(ids), len(ids) + len(tokens)))
            wanted[seq_id] = rows if all_logits else rows[-1:]
            for pos, token in zip(range(start, end), tokens):
                ids.append(token)
                positions.append(pos)
                for g, blocks in enumerate(seq["blocks"]):
                    slots[g].append(blocks[pos // self.block_size] * self.block_size + pos % self.block_size)
            seq["len"] = end
            for g, blocks in enumerate(seq["blocks"]):
                tables[g].append(blocks)
            ctx_lens.append(end)
            query_lens.append(len(tokens))
        is_decode = all(n == 1 for n in query_lens)
        for _ in range(len(ids), pad_to):  # padding rows of a fixed-size decode batch
            ids.append(0), positions.append(0), ctx_lens.append(0)
            for g in range(self.num_groups):
                slots[g].append(-1), tables[g].append([])
            query_lens.append(1)
        width = max(table_width, *(len(t) for t in tables[0]))
        block_tables = [torch.tensor([t + [0] * (width - len(t)) for t in group], dtype=torch.int32, device=device)
                        for group in tables]
        slot_mappings = [torch.tensor(group, device=device) for group in slots]
        order = [row for rows in wanted.values() for row in rows]
        batch = ForwardBatch(
            input_ids=torch.tensor(ids, device=device),
            positions=torch.tensor(positions, device=device),
            slot_mapping=slot_mappings[0],
            block_tables=block_tables[0],
            group_block_tables=tuple(block_tables[1:]),
            group_slot_mappings=tuple(slot_mappings[1:]),
            context_lens=torch.tensor(ctx_lens, dtype=torch.int32, device=device),
            query_start_loc=torch.tensor([0] + list(torch.tensor(query_lens).cumsum(0)), dtype=torch.int32,
                                         device=device),
            logits_indices=torch.tensor(order, device=device),
            is_decode=is_decode,
            query_lens_host=query_lens,
            context_lens_host=ctx_lens,
        )
        return batch, wanted

    def prefill_then_decode(self, prompt: list[int], prefill: int, pad_to: int = 0, seq_id: str = "s") -> torch.Tensor:
        """Logits of every position [len(prompt), V] on the CPU: the first `prefill` tokens in one chunk, then one
        decode step per token (padded to `pad_to` rows if set)."""
        rows = [self.step({seq_id: prompt[:prefill]}, all_logits=True)[seq_id]]
        rows += [self.step({seq_id: [t]}, pad_to=pad_to)[seq_id] for t in prompt[prefill:]]
        return torch.cat(rows).cpu()

    def greedy(self, prompt: list[int], max_new_tokens: int, chunk: int = 0, seq_id: str = "s") -> list[int]:
        """Greedy continuation: prefill (in chunks of `chunk` tokens if set), then one decode step per token."""
        chunk = chunk or len(prompt)
        for start in range(0, len(prompt), chunk):
            logits = self.step({seq_id: prompt[start : start + chunk]})[seq_id]
        generated = [int(logits[-1].argmax())]
        while len(generated) < max_new_tokens:
            generated.append(int(self.step({seq_id: [generated[-1]]})[seq_id][-1].argmax()))
        return generated


def hf_greedy(hf_model, prompt: list[int], max_new_tokens: int) -> list[int]:
    device = hf_model.device
    out = hf_model.generate(torch.tensor([prompt], device=device),
                            attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=device),
                            max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=0)
    return out[0, len(prompt):].tolist()


def completion_text(tokenizer, prompt: list[int], output: list[int]) -> str:
    """The completion text a client gets for `output` after a token-id `prompt`: the output's part of the whole
    decode. A prompt ending inside a character (random ids) has it finished by the output's bytes or shown as a
    replacement character there, as vLLM's detokenizer does; a decode of the output ids alone would drop it."""
    return tokenizer.decode(prompt + output)[len(tokenizer.decode(prompt).rstrip("\ufffd")):]


@torch.no_grad()
def hf_logits(hf_model, prompt: list[int]) -> torch.Tensor:
    return hf_model(torch.tensor([prompt], device=hf_model.device)).logits[0].float()  # [n, V]


def max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|."""
    return float((actual.float() - expected.float()).abs().max() / expected.float().abs().max())


def row_errors(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """Per row (token): max |actual - expected| / max |expected| over the whole tensor. [rows]"""
    return (actual.float() - expected.float()).abs().amax(-1) / expected.float().abs().max()


def assert_bf16_close(ours: torch.Tensor, hf_bf16: torch.Tensor, golden: torch.Tensor) -> None:
    """bf16 tolerance measured against transformers' own bf16 error. A bf16 rounding difference can flip a token's
    top-k expert choice (a discontinuity), in our run or in HF's, at different tokens; so compare the typical
    (median) token's error, and bound the worst tokens loosely: one token in 16 may be past the loose bound (a flip
    seen on the GPU: 0.26 at one token of 17 for DeepSeek-V3-YaRN, HF's own worst 0.05), none past 1 (a wrong model
    is off by O(1) at most tokens)."""
    ours_rows, hf_rows = row_errors(ours, golden), row_errors(hf_bf16, golden)
    assert ours_rows.median() <= 2 * hf_rows.median() + 1e-3, (ours_rows, hf_rows)
    loose = max(0.25, 2 * float(hf_rows.max()))
    assert int((ours_rows > loose).sum()) <= max(1, len(ours_rows) // 16), (ours_rows, hf_rows)
    assert ours_rows.max() <= 1.0, (ours_rows, hf_rows)


def assert_gpu_within_cpu_bf16_spread(cpu32, cpu16, gpu, prompt: list[int], label: str) -> None:
    """The GPU model (bf16; prefill 9 tokens, then decode steps) stays, against the CPU float32 model, within twice
    the CPU bf16 model's own distance from it: median row and (loosely) worst row."""
    golden = PagedRunner(cpu32).step({"s": prompt}, all_logits=True)["s"]
    ref16 = PagedRunner(cpu16).step({"s": prompt}, all_logits=True)["s"]
    ours = PagedRunner(gpu, block_size=16).prefill_then_decode(prompt, 9)
    bf16_error, ours_error = row_errors(ref16, golden), row_errors(ours, golden)
    print(f"{label}: CPU bf16 vs fp32 max row err {bf16_error.max():.3g}, GPU {ours_error.max():.3g}")
    assert ours_error.median() <= 2 * bf16_error.median() + 1e-3
    assert ours_error.max() <= max(0.25, 2 * float(bf16_error.max()))


def assert_paged_matches_hf(ours, hf_model, prompt: list[int], greedy_tokens: int = 12) -> None:
    """float32: prefill 6 tokens then padded decode steps give HF's logits (1e-4), and the greedy continuation is
    HF's `generate`."""
    logits = PagedRunner(ours).prefill_then_decode(prompt, 6, pad_to=2)
    assert max_relative_error(logits, hf_logits(hf_model, prompt)) < 1e-4
    assert PagedRunner(ours).greedy(prompt, greedy_tokens) == hf_greedy(hf_model, prompt, greedy_tokens)


def assert_decode_graph_matches_eager(ours, prompts: dict[str, list[int]], steps: int = 6) -> None:
    """Prefill `prompts` (3 of them), capture one decode step padded to 4 rows in a CUDA graph, replay it `steps` times
    with new tokens: each replay's logits and the KV cache equal an eager run of the same steps (bf16 tolerance;
    the eager step computes 3 logits rows, the graph 4, so cuBLAS may pick another GEMM for the head)."""
    vocab = ours.config.vocab_size
    eager, graphed = PagedRunner(ours, block_size=4), PagedRunner(ours, block_size=4)
    first = eager.step(prompts)
    graphed.step(prompts)
    graphed.kv_cache.copy_(eager.kv_cache)
    rows, width = len(prompts) + 1, 12  # one padding row; block tables padded to a fixed width
    static, _ = graphed.prepare({k: [0] for k in prompts}, pad_to=rows, table_width=width)
    static.logits_indices = torch.arange(rows, device="cuda")
    graphed.seqs = {k: dict(v, len=v["len"] - 1) for k, v in graphed.seqs.items()}  # that step was a dry run
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            ours(static, graphed.kv_cache.clone())  # warm-up on a scratch cache
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_logits = ours(static, graphed.kv_cache)

    tokens = {k: int(v[-1].argmax()) for k, v in first.items()}
    for _ in range(steps):
        expected = eager.step({k: [t] for k, t in tokens.items()}, pad_to=rows)
        step, _ = graphed.prepare({k: [t] for k, t in tokens.items()}, pad_to=rows, table_width=width)
        for name in ("input_ids", "positions", "slot_mapping", "block_tables", "context_lens"):
            getattr(static, name).copy_(getattr(step, name))
        for name in ("group_block_tables", "group_slot_mappings"):  # models with sliding-window layers
            for dst, src in zip(getattr(static, name), getattr(step, name), strict=True):
                dst.copy_(src)
        graph.replay()
        for i, key in enumerate(prompts):
            torch.testing.assert_close(static_logits[i], expected[key][-1], rtol=2e-2, atol=2e-2)
        tokens = {k: int(expected[k][-1].argmax()) % vocab for k in prompts}
    torch.testing.assert_close(graphed.kv_cache, eager.kv_cache, rtol=2e-2, atol=2e-2)
