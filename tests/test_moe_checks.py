"""Every error path of `check_moe_inputs`, through the public `fused_moe`: each bad input gives a TypeError or
ValueError whose message names the offending argument, before any computation."""

import pytest
import torch

from model.kernels import extension, fused_moe
from model.kernels.moe import MAX_EXPERTS

T, E, K, H, I = 5, 8, 2, 16, 8


def good(dtype=torch.bfloat16):
    """A valid problem as a dict of fused_moe's keyword arguments."""
    return dict(
        x=torch.randn(T, H).to(dtype),
        w13=torch.randn(E, 2 * I, H).to(dtype),
        w2=torch.randn(E, H, I).to(dtype),
        topk_weights=torch.full((T, K), 0.5),
        topk_ids=torch.arange(T * K, dtype=torch.int32).reshape(T, K) % E,
    )


def with_(**changes):
    args = good()
    args.update(changes)
    return args


def test_the_valid_problem_passes():
    assert fused_moe(**good()).shape == (T, H)


BAD_INPUTS = {
    # name: (kwargs, exception, message regex)
    "x not a tensor": (with_(x=[[1.0] * H] * T), TypeError, "x must be a torch.Tensor"),
    "topk_ids not a tensor": (with_(topk_ids=None), TypeError, "topk_ids must be a torch.Tensor"),
    "x float64": (with_(x=torch.randn(T, H, dtype=torch.float64)), TypeError, "x must be bfloat16"),
    "x int": (with_(x=torch.ones(T, H, dtype=torch.int32)), TypeError, "x must be bfloat16"),
    "w13 dtype differs": (with_(w13=torch.randn(E, 2 * I, H, dtype=torch.float16)), TypeError, "w13.dtype"),
    "w2 dtype differs": (with_(w2=torch.randn(E, H, I)), TypeError, "w2.dtype"),
    "weights bf16": (with_(topk_weights=torch.full((T, K), 0.5, dtype=torch.bfloat16)), TypeError, "topk_weights"),
    "ids int64": (with_(topk_ids=torch.zeros(T, K, dtype=torch.int64)), TypeError, "topk_ids must be int32"),
    "x 3-D": (with_(x=torch.randn(1, T, H).bfloat16()), ValueError, r"x \[T, H\]"),
    "w13 2-D": (with_(w13=torch.randn(2 * I, H).bfloat16()), ValueError, r"w13 \[E, 2I, H\]"),
    "ids 1-D": (with_(topk_ids=torch.zeros(T, dtype=torch.int32)), ValueError, r"topk_ids \[T, k\]"),
    "w13 wrong H": (with_(w13=torch.randn(E, 2 * I, H + 8).bfloat16()), ValueError, "w13 must be"),
    "w13 odd rows": (with_(w13=torch.randn(E, 2 * I + 1, H).bfloat16()), ValueError, "w13 must be"),
    "w2 wrong I": (with_(w2=torch.randn(E, H, I + 8).bfloat16()), ValueError, "w2 must be"),
    "w2 wrong E": (with_(w2=torch.randn(E + 1, H, I).bfloat16()), ValueError, "w2 must be"),
    "ids/weights k differ": (
        with_(topk_ids=torch.zeros(T, K + 1, dtype=torch.int32)), ValueError, "must both be",
    ),
    "ids T differs from x": (
        with_(topk_ids=torch.zeros(T + 1, K, dtype=torch.int32), topk_weights=torch.ones(T + 1, K)),
        ValueError,
        "must both be",
    ),
    "k == 0": (
        with_(topk_ids=torch.zeros(T, 0, dtype=torch.int32), topk_weights=torch.ones(T, 0)),
        ValueError,
        "top-k must be at least 1",
    ),
    "H not multiple of 8": (
        with_(x=torch.randn(T, 12).bfloat16(), w13=torch.randn(E, 2 * I, 12).bfloat16(),
              w2=torch.randn(E, 12, I).bfloat16()),
        ValueError,
        "multiples of 8",
    ),
    "I not multiple of 8": (
        with_(w13=torch.randn(E, 2 * 12, H).bfloat16(), w2=torch.randn(E, H, 12).bfloat16()),
        ValueError,
        "multiples of 8",
    ),
    "E > MAX_EXPERTS": (
        with_(w13=torch.zeros(MAX_EXPERTS + 1, 2 * I, H).bfloat16(), w2=torch.zeros(MAX_EXPERTS + 1, H, I).bfloat16()),
        ValueError,
        f"number of experts {MAX_EXPERTS + 1}",
    ),
    "E == 0": (
        with_(w13=torch.zeros(0, 2 * I, H).bfloat16(), w2=torch.zeros(0, H, I).bfloat16()),
        ValueError,
        "number of experts 0",
    ),
    "x not contiguous": (with_(x=torch.randn(H, T).bfloat16().t()), ValueError, "x must be contiguous"),
    "w13 not contiguous": (
        with_(w13=torch.randn(E, H, 2 * I).bfloat16().transpose(1, 2)), ValueError, "w13 must be contiguous",
    ),
    "w2 not contiguous": (with_(w2=torch.randn(E, I, H).bfloat16().transpose(1, 2)), ValueError, "w2 must be contig"),
    "weights not contiguous": (
        with_(topk_weights=torch.ones(K, T).t()), ValueError, "topk_weights must be contiguous",
    ),
    "ids not contiguous": (
        with_(topk_ids=torch.zeros(K, T, dtype=torch.int32).t()), ValueError, "topk_ids must be contiguous",
    ),
    "id negative": (with_(topk_ids=torch.full((T, K), -1, dtype=torch.int32)), ValueError, "expert ids must be in"),
    "id == E": (with_(topk_ids=torch.full((T, K), E, dtype=torch.int32)), ValueError, "expert ids must be in"),
    "device mismatch (meta x)": (
        with_(x=torch.empty(T, H, dtype=torch.bfloat16, device="meta")), ValueError, "one device",
    ),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_raises_a_clear_error(case):
    kwargs, exc, message = BAD_INPUTS[case]
    with pytest.raises(exc, match=message):
        fused_moe(**kwargs)


@pytest.mark.parametrize(
    "load,message",
    [
        (torch.zeros(E, dtype=torch.int32), "expert_load must be int64"),
        (torch.zeros(E + 1, dtype=torch.int64), "expert_load must be int64"),
        (torch.zeros(1, E, dtype=torch.int64), "expert_load must be int64"),
        (torch.zeros(E, dtype=torch.int64, device="meta"), "one device"),
        # a strided view: the CUDA kernel adds counts through data_ptr() as if contiguous
        (torch.zeros(2 * E, dtype=torch.int64)[::2], "contiguous"),
    ],
)
def test_bad_expert_load_raises(load, message):
    with pytest.raises(ValueError, match=message):
        fused_moe(**good(), expert_load=load)


def test_bad_expert_load_is_not_modified_and_output_not_computed():
    load = torch.zeros(E + 1, dtype=torch.int64)
    with pytest.raises(ValueError):
        fused_moe(**with_(topk_ids=torch.full((T, K), E, dtype=torch.int32)), expert_load=torch.zeros(E, dtype=torch.int64))
    with pytest.raises(ValueError):
        fused_moe(**good(), expert_load=load)
    assert int(load.abs().sum()) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_and_cuda_tensors_mixed_raise():
    with pytest.raises(ValueError, match="one device"):
        fused_moe(**with_(x=torch.randn(T, H, device="cuda").bfloat16()))


def test_out_of_range_ids_are_skipped_only_when_asked():
    """With skip_out_of_range_ids, a slot whose id is outside [0, E) contributes nothing and is not counted —
    the same result as giving that slot weight 0 on a valid expert, with load counted by hand."""
    g = torch.Generator().manual_seed(3)
    T, k, E, H, I = 9, 3, 5, 16, 8
    x = torch.randn(T, H, generator=g)
    w13 = torch.randn(E, 2 * I, H, generator=g) * 0.2
    w2 = torch.randn(E, H, I, generator=g) * 0.2
    weights = torch.rand(T, k, generator=g)
    ids = torch.randint(0, E, (T, k), generator=g, dtype=torch.int32)
    foreign = torch.rand(T, k, generator=g) < 0.4
    foreign[0, 0] = True
    ids_with_foreign = ids.masked_fill(foreign, -1)
    ids_with_foreign[1][foreign[1]] = E + 2  # past the end too
    with pytest.raises(ValueError, match="expert ids must be in"):
        fused_moe(x, w13, w2, weights, ids_with_foreign)
    load = torch.zeros(E, dtype=torch.int64)
    out = fused_moe(x, w13, w2, weights, ids_with_foreign, expert_load=load, skip_out_of_range_ids=True)
    expected = fused_moe(x, w13, w2, weights.masked_fill(foreign, 0.0), ids.masked_fill(foreign, 0))
    torch.testing.assert_close(out, expected)
    kept = [int(e) for e, f in zip(ids.flatten().tolist(), foreign.flatten().tolist()) if not f]
    assert load.tolist() == [kept.count(e) for e in range(E)]


@pytest.mark.skipif(not extension.is_built(), reason="the _C extension is not built")
def test_the_extension_takes_the_same_expert_limit():
    """C++ defines the limit once (moe::kMaxExperts, read by the bindings, forward and plan); Python keeps its own
    copy for the pure-torch path where _C is not built. This holds the two equal and the bindings enforcing it."""
    assert extension._C.MAX_EXPERTS == MAX_EXPERTS
    assert extension._C.moe_launch_config(1, 1, MAX_EXPERTS, 64, 64)[0] > 0
    with pytest.raises(ValueError, match="invalid MoE problem"):
        extension._C.moe_launch_config(1, 1, MAX_EXPERTS + 1, 64, 64)
