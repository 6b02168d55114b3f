"""Content hashes of full KV blocks, chained so that a block's hash names its tokens and every token before it.

A block's K/V depend on its own tokens, on all earlier tokens of the sequence (attention) and on what produced
them: the model (weights, dtype) and, later, an adapter. So block i's hash is H(hash of block i-1, its tokens),
and the chain starts from a root that hashes the engine's model key and the sequence's `cache_salt`. Equal hashes
then mean equal K/V, and a prefix is found by walking a new prompt's chain through the cache.

BLAKE2b, not Python's `hash()`: the built-in tuple hash is cheap to collide on purpose, and a collision would hand
one client's cached K/V to another's prompt. 128 bits keep accidental collisions out of reach.
"""

import hashlib
import struct

from model.engine.sequence import PENDING_TOKEN, Sequence

DIGEST_BYTES = 16


def root_hash(model_key: bytes, cache_salt: bytes = b"") -> bytes:
    """Start of every chain: the model's identity and the sequence's own salt (length-prefixed, so the pair
    (b"ab", b"c") differs from (b"a", b"bc"))."""
    h = hashlib.blake2b(digest_size=DIGEST_BYTES, person=b"staticmoe-kv")
    for key in (model_key, cache_salt):
        h.update(len(key).to_bytes(8, "little"))
        h.update(key)
    return h.digest()


def block_hash(parent: bytes, tokens: list[int]) -> bytes:
    return hashlib.blake2b(parent + struct.pack(f"<{len(tokens)}q", *tokens), digest_size=DIGEST_BYTES).digest()


def extend_block_hashes(seq: Sequence, model_key: bytes, block_size: int, num_blocks: int) -> None:
    """Grow seq.block_hashes towards `num_blocks` entries, one per full block whose tokens are all known (a
    PENDING_TOKEN placeholder ends the walk). Computed once per block: a sequence's tokens only grow."""
    hashes, tokens = seq.block_hashes, seq.token_ids
    while len(hashes) < num_blocks:
        start = len(hashes) * block_size
        block = tokens[start : start + block_size]
        if len(block) < block_size or PENDING_TOKEN in block:
            return
        parent = hashes[-1] if hashes else root_hash(model_key, seq.cache_salt)
        hashes.append(block_hash(parent, block))
