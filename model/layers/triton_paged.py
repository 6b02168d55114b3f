"""What the paged attention kernels share (`triton_decode_attention`, `triton_prefill_attention`): the optional Triton
import, loading a tile of keys and values through a sequence's block table, and one online-softmax step
(FlashAttention's running max, sum and accumulator)."""

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = tl = None


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def dot(a, b, IEEE: tl.constexpr):
        """`tl.dot`, in full fp32 precision when IEEE (the fp32 tests compare against SDPA at 1e-5)."""
        if IEEE:
            return tl.dot(a, b, input_precision="ieee")
        return tl.dot(a, b)

    @triton.jit
    def load_kv_tile(k_ptr, v_ptr, tables_ptr, seq, table_stride, pos, in_range, kv_head,
                     NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr):
        """Keys and values [len(pos), HEAD_DIM] of one KV head at sequence positions `pos` (zeros where not
        in_range), found through the sequence's row of the block table."""
        offs_d = tl.arange(0, HEAD_DIM)
        block = tl.load(tables_ptr + seq.to(tl.int64) * table_stride + pos // PAGE, mask=in_range, other=0)
        slot = block.to(tl.int64) * PAGE + pos % PAGE
        kv_offs = slot[:, None] * (NUM_KV_HEADS * HEAD_DIM) + kv_head * HEAD_DIM + offs_d[None, :]
        k = tl.load(k_ptr + kv_offs, mask=in_range[:, None], other=0.0)
        v = tl.load(v_ptr + kv_offs, mask=in_range[:, None], other=0.0)
        return k, v

    @triton.jit
    def online_softmax_step(m_i, l_i, acc, scores, v, IEEE: tl.constexpr):
        """Folds one tile of scaled, masked scores [rows, n] (-inf where hidden) and its values [n, D] into the
        running max m_i, sum l_i and accumulator acc of each row. A row that has seen no key yet keeps m = -inf
        and adds nothing (no exp(-inf - -inf))."""
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(scores - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, IEEE)
        return m_new, l_i, acc
