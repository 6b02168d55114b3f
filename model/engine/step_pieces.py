"""A decoder step cut at its attention calls, for the piecewise CUDA graphs of mixed steps
(piecewise_graphs.py).

A step that prefills cannot be one CUDA graph: its attention depends on the chunk lengths the host knows. Everything
else (embedding, norms, projections, rotary, router, experts, residual adds) is row-wise, with shapes set by the row
count alone, so it can be captured at bucketed row counts in L + 1 pieces around the L attention calls, as vLLM's
piecewise graphs do. Without them such a step is ~800 kernel launches of Python, 25–50 ms of host time for ~15 ms
of GPU work (benchmarks/NOTES.md, "Prefill steps").

The pieces read and write `PieceBuffers`: static tensors sized for the largest bucket, of which a step uses the
first rows. Piece 0 embeds and projects layer 0's attention inputs; piece i (0 < i < L) finishes layer i - 1
(o_proj, residual add and norm, MoE or MLP) and projects layer i's; piece L finishes the last layer. `attend` runs
layer i's cache write and attention eagerly on the real rows in between. Rows past the real ones (padding) hold the
padding token at position 0 and a zero attention output, never touch the cache, and route to no expert
(`is_padding`, model/layers/padding_rows.py).
"""

from dataclasses import dataclass, fields

import torch

from model.decoder import MoeCausalLM
from model.engine.decode_inputs import PAD_TOKEN
from model.forward_batch import ForwardBatch
from model.layers.paged_attention import AttentionPlan


@dataclass
class PieceBuffers:
    input_ids: torch.Tensor  # [M] int64
    positions: torch.Tensor  # [M] int64
    cos: torch.Tensor  # [M, 1, R] rotary tables of the positions
    sin: torch.Tensor
    hidden: torch.Tensor  # [M, H] the residual stream
    attn: torch.Tensor  # [M, W] the attention output (W = o_proj's input width)
    is_padding: torch.Tensor  # [M] bool, the rows past the step's real ones
    projected: tuple[torch.Tensor, ...]  # the next layer's attention inputs, as its `project` returns them:
    #   q [M, Hq, D], k, v [M, Hkv, D] for grouped-query attention; MLA's q_nope, q_pe, latent, k_pe

    @staticmethod
    def allocate(model: MoeCausalLM, rows: int, device: torch.device, dtype: torch.dtype) -> "PieceBuffers":
        attn = model.model.layers[0].self_attn
        cos, sin = model.model.rotary_emb(torch.zeros(1, dtype=torch.int64, device=device), dtype)
        one_row = attn.project(torch.zeros(1, model.config.hidden_size, dtype=dtype, device=device), (cos, sin))
        return PieceBuffers(
            input_ids=torch.full((rows,), PAD_TOKEN, dtype=torch.int64, device=device),
            positions=torch.zeros(rows, dtype=torch.int64, device=device),
            cos=torch.zeros((rows, *cos.shape[1:]), dtype=dtype, device=device),
            sin=torch.zeros((rows, *sin.shape[1:]), dtype=dtype, device=device),
            hidden=torch.zeros(rows, model.config.hidden_size, dtype=dtype, device=device),
            attn=torch.zeros(rows, attn.o_proj.in_features, dtype=dtype, device=device),
            is_padding=torch.ones(rows, dtype=torch.bool, device=device),
            projected=tuple(torch.zeros((rows, *t.shape[1:]), dtype=t.dtype, device=device) for t in one_row),
        )

    def first(self, rows: int) -> "PieceBuffers":
        """Views of the first `rows` rows (a bucket's buffers)."""
        return PieceBuffers(*(getattr(self, f.name)[:rows] for f in fields(self) if f.name != "projected"),
                            projected=tuple(t[:rows] for t in self.projected))


def supported(model) -> bool:
    """Pieces exist for the single-rank decoder (not a tensor- or expert-parallel model, whose ranks would have to
    run the same pieces)."""
    return type(model) is MoeCausalLM and all(hasattr(layer.self_attn, "project") for layer in model.model.layers)


def num_pieces(model: MoeCausalLM) -> int:
    return len(model.model.layers) + 1


def run_piece(model: MoeCausalLM, index: int, buf: PieceBuffers) -> None:
    """Piece `index` of a step over all rows of `buf` (see the module doc)."""
    layers = model.model.layers
    if index == 0:
        h = model.model.embed_tokens(buf.input_ids)
        cos, sin = model.model.rotary_emb(buf.positions, h.dtype)
        buf.cos.copy_(cos)
        buf.sin.copy_(sin)
        delta = None
    else:
        done = layers[index - 1]
        h, delta = done.after_attention(buf.hidden, done.self_attn.o_proj(buf.attn))
    if index < len(layers):
        layer = layers[index]
        h, normed = layer.enter(h, delta)  # the previous layer's MLP output added inside this layer's input norm
        for into, value in zip(buf.projected, layer.self_attn.project(normed, (buf.cos, buf.sin)), strict=True):
            into.copy_(value)
    else:
        h = h + delta  # after the last layer: the whole stream, which `logits` norms
    buf.hidden.copy_(h)


def attend(model: MoeCausalLM, index: int, buf: PieceBuffers, rows: int, plans: list[AttentionPlan],
           kv_cache: torch.Tensor) -> None:
    """Layer `index`'s cache write and attention over the first `rows` (real) rows, eagerly, into buf.attn."""
    plan, cache = model.layer_attention_inputs(index, plans, kv_cache)
    attn = model.model.layers[index].self_attn
    attn.attend(*(t[:rows] for t in buf.projected), plan, cache, out=buf.attn[:rows].view(rows, attn.num_heads, -1))


def load_inputs(buf: PieceBuffers, batch: ForwardBatch) -> None:
    """A step's token ids and positions into the first rows; the rest of `buf` (a bucket's) becomes padding: the
    padding token at position 0 with a zero attention output, routed to no expert."""
    rows = batch.num_tokens
    buf.input_ids[:rows].copy_(batch.input_ids)
    buf.positions[:rows].copy_(batch.positions)
    buf.is_padding[:rows].fill_(False)
    buf.input_ids[rows:].fill_(PAD_TOKEN)
    buf.positions[rows:].zero_()
    buf.attn[rows:].zero_()
    buf.is_padding[rows:].fill_(True)


def logits(model: MoeCausalLM, buf: PieceBuffers, batch: ForwardBatch) -> torch.Tensor:
    """After piece L: float32 logits [S, V] of the rows `batch.logits_indices` selects (as MoeCausalLM.forward)."""
    return model.head(model.model.norm(buf.hidden[: batch.num_tokens][batch.logits_indices]))
