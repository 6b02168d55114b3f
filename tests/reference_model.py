"""An independent reference for what the engine computes: the tiny model's logits at every position of a whole
sequence, from one plain prefill into a fresh KV cache (no scheduler, no chunking, no CUDA graphs, no sampler)."""

import torch


def full_forward(model, token_ids: list[int], on_router_input=None) -> torch.Tensor:
    """One prefill of the whole sequence (a fresh KV cache): logits of every position. [L, V]"""
    from model.forward_batch import ForwardBatch

    block_size, length = 16, len(token_ids)
    num_blocks = length // block_size + 2
    cache = torch.zeros(model.kv_cache_shape(num_blocks, block_size), dtype=torch.float32)
    blocks = list(range(1, num_blocks))
    positions = torch.arange(length)
    slots = torch.tensor([blocks[p // block_size] * block_size + p % block_size for p in range(length)])
    batch = ForwardBatch(
        input_ids=torch.tensor(token_ids), positions=positions, slot_mapping=slots,
        block_tables=torch.tensor([blocks], dtype=torch.int32), context_lens=torch.tensor([length], dtype=torch.int32),
        query_start_loc=torch.tensor([0, length], dtype=torch.int32), logits_indices=positions.clone(),
        is_decode=False, query_lens_host=[length], context_lens_host=[length])
    hooks = []
    if on_router_input is not None:
        for block in model.moe_blocks():
            hooks.append(block.register_forward_pre_hook(
                lambda module, args: on_router_input(module, args[0])))
    try:
        with torch.no_grad():
            return model(batch, cache)
    finally:
        for hook in hooks:
            hook.remove()


def tiny_reference_model():
    from model.loader import load_model

    model, _ = load_model("tiny", dtype=torch.float32, device="cpu")
    return model
