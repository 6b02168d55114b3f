"""Content hashes of full KV blocks, chained so that a block's hash names its tokens and every token before it.

A block's K/V depend on its own tokens, on all earlier tokens of the sequence (attention) and on what produced
them: the model (weights, dtype) and, later, an adapter. So block i's hash is H(hash of block i-1, its tokens),
and the chain starts from a root that hashes the engine's model key and the sequence's `cache_salt`. Equal hashes
then mean equal K/V, and a prefix is found by walking a new prompt's chain through the cache.

BLAKE2b, not Python's `hash()`: the built-in tuple hash is cheap to collide on purpose, and a collision would hand
one client's cached K/V to another's prompt. 128 bits keep accidental collisions out of reach.
"""

import array
import hashlib
import sys

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


def _token_bytes(tokens: list[int]) -> bytes:
    """Tokens as little-endian int64: the bytes a block's hash covers."""
    packed = array.array("q", tokens)
    if sys.byteorder != "little":
        packed.byteswap()
    return packed.tobytes()


def block_hash(parent: bytes, tokens: list[int]) -> bytes:
    return hashlib.blake2b(parent + _token_bytes(tokens), digest_size=DIGEST_BYTES).digest()


def extend_block_hashes(seq: Sequence, model_key: bytes, block_size: int, num_blocks: int) -> None:
    """Grow seq.block_hashes towards `num_blocks` entries, one per full block whose tokens are all known (a
    PENDING_TOKEN placeholder ends the walk). Computed once per block: a sequence's tokens only grow. The tokens
    to hash are packed once and sliced per block (half the time of packing block by block: a burst of 64
    prompts of 4k tokens is hashed on the engine thread, between steps)."""
    hashes, tokens = seq.block_hashes, seq.token_ids
    first = len(hashes)
    end = min(num_blocks, len(tokens) // block_size)
    if end <= first:
        return
    span = tokens[first * block_size : end * block_size]
    if PENDING_TOKEN in span:
        end = first + span.index(PENDING_TOKEN) // block_size
        span = span[: (end - first) * block_size]
    data, width = _token_bytes(span), 8 * block_size
    parent = hashes[-1] if hashes else root_hash(model_key, seq.cache_salt)
    for i in range(end - first):
        parent = hashlib.blake2b(parent + data[i * width : (i + 1) * width], digest_size=DIGEST_BYTES).digest()
        hashes.append(parent)
