"""Which kernel a dense FP8 linear takes on a GPU (`fp8_linear_path`), decided on the CPU: the STATICMOE_FP8_DENSE
knob, the shapes and layouts the CUDA kernel (csrc/moe/dense_fp8.cu) takes, and the checks at its boundary. The
device-level availability (`block_scaled_mm_supported`, `extension.available_for`, Triton) is monkeypatched: only
the choice is under test here; the kernels themselves are in tests/test_fp8_dense_cuda_gpu.py."""

import importlib

import pytest
import torch

from model.kernels import extension
from tests.fp8_fixtures import quantize_blocks
from tests.triton_fixtures import switch_setter

fl = importlib.import_module("model.kernels.fp8_linear")  # the module: model.kernels exports a function of that name

CUDA = torch.device("cuda", 0)


@pytest.fixture
def knob(monkeypatch):
    """Sets STATICMOE_FP8_DENSE (None: unset) and forgets the cached read; restores the cache afterwards."""
    yield from switch_setter(monkeypatch, "STATICMOE_FP8_DENSE", fl.dense_fp8_kernel)


@pytest.fixture
def hopper_without_cublas_recipe(monkeypatch):
    """A device where block scaled_mm is refused (the H100's torch build), the extension is built and Triton runs."""
    monkeypatch.setattr(fl, "block_scaled_mm_supported", lambda device: False)
    monkeypatch.setattr(extension, "available_for", lambda device: device.type == "cuda")
    monkeypatch.setattr(fl.triton_fp8_gemm, "available", lambda: True)


def linear(N=256, K=256, dtype=torch.bfloat16, bias=False):
    gen = torch.Generator().manual_seed(N + K)
    q, scale = quantize_blocks(torch.randn(N, K, generator=gen))
    b = torch.randn(N, generator=gen).to(dtype) if bias else None
    return torch.randn(3, K, generator=gen).to(dtype), q, scale, b


def test_knob_defaults_to_auto_and_rejects_other_values(knob):
    knob(None)
    assert fl.dense_fp8_kernel() == "auto"
    knob("cuda")
    assert fl.dense_fp8_kernel() == "cuda"
    knob("triton")
    assert fl.dense_fp8_kernel() == "triton"
    knob("cutlass")
    with pytest.raises(ValueError, match=r"STATICMOE_FP8_DENSE='cutlass': want one of auto, cuda, triton"):
        fl.dense_fp8_kernel()


def test_knob_is_read_once(knob, monkeypatch):
    knob("cuda")
    assert fl.dense_fp8_kernel() == "cuda"
    monkeypatch.setenv("STATICMOE_FP8_DENSE", "triton")
    assert fl.dense_fp8_kernel() == "cuda"


def test_cuda_knob_chooses_the_cuda_kernel(knob, hopper_without_cublas_recipe):
    knob("cuda")
    x, q, s, b = linear(bias=True)
    assert fl.fp8_linear_path(x, q, s, b, device=CUDA) == "cuda"
    assert fl.fp8_linear_path(x, q, s, None, device=CUDA) == "cuda"
    assert fl.dense_fp8_path(CUDA) == "cuda"
    # the CPU never leaves the reference, whatever the knob says
    assert fl.fp8_linear_path(x, q, s, b) == "reference"
    assert fl.dense_fp8_path(torch.device("cpu")) == "reference"


def test_default_takes_triton_for_small_gemms(knob, hopper_without_cublas_recipe):
    knob(None)
    x, q, s, b = linear(bias=True)
    assert fl.fp8_linear_path(x, q, s, b, device=CUDA) == "triton"
    assert fl.dense_fp8_path(CUDA) == "triton"


def meta_linear(M, N, K):
    """Shape-only tensors: the choice reads shapes, dtypes and layouts, never values."""
    return (torch.empty(M, K, dtype=torch.bfloat16, device="meta"),
            torch.empty(N, K, dtype=torch.float8_e4m3fn, device="meta"),
            torch.empty(-(-N // 128), K // 128, device="meta"))


@pytest.mark.parametrize("M, N, K, want", [
    (4096, 576, 7168, "cuda"),      # every shape at 4096 rows (DeepSeek-V3 kv_a: 95 vs 122 us on the H100)
    (4095, 576, 7168, "triton"),    # a small weight below 4096 rows (kv_a at 1024: Triton 52 vs 57 us)
    (512, 24576, 1536, "cuda"),     # a large weight from 512 rows (q_b: 62 vs 69 us)
    (511, 24576, 1536, "triton"),
    (1024, 2048, 4096, "triton"),   # 8 Mi weight elements (Qwen3 o at 1024: 31 vs 41 us)
    (2, 7168, 16384, "triton"),     # decode rows: too few tiles for the CUDA kernel
])
def test_auto_takes_the_cuda_kernel_for_large_gemms(knob, hopper_without_cublas_recipe, M, N, K, want):
    knob(None)
    assert fl.fp8_linear_path(*meta_linear(M, N, K), device=CUDA) == want
    # the leading dimensions of x count as rows
    x, w, s = meta_linear(M, N, K)
    assert fl.fp8_linear_path(x.view(1, M, K), w, s, device=CUDA) == want


def test_auto_falls_back_to_triton_where_the_cuda_kernel_cannot_run(knob, hopper_without_cublas_recipe, monkeypatch):
    knob(None)
    x, w, s = meta_linear(4096, 576, 7168)
    assert fl.fp8_linear_path(x.half(), w, s, device=CUDA) == "triton"  # the CUDA quantiser reads bf16
    monkeypatch.setattr(extension, "available_for", lambda device: False)
    assert fl.fp8_linear_path(x, w, s, device=CUDA) == "triton"
    assert fl.dense_fp8_path(CUDA, rows=4096) == "triton"


def test_block_scaled_mm_still_comes_first(knob, hopper_without_cublas_recipe, monkeypatch):
    knob("cuda")
    monkeypatch.setattr(fl, "block_scaled_mm_supported", lambda device: True)
    x, q, s, _ = linear()
    assert fl.fp8_linear_path(x, q, s, device=CUDA) == "scaled_mm"
    assert fl.dense_fp8_path(CUDA) == "scaled_mm"


def test_what_the_cuda_kernel_cannot_take_goes_to_triton(knob, hopper_without_cublas_recipe):
    knob("cuda")
    x, q, s, b = linear(N=200, bias=True)  # ragged last scale block: N a multiple of 8 is enough
    assert fl.fp8_linear_path(x, q, s, b, device=CUDA) == "cuda"
    x, q, s, _ = linear(N=196)  # N not a multiple of 8: the epilogue's column pairs and bias copies need it
    assert fl.fp8_linear_path(x, q, s, device=CUDA) == "triton"
    x, q, s, b = linear(bias=True)
    assert fl.fp8_linear_path(x.half(), q, s, device=CUDA) == "triton"  # the quantiser reads bf16
    assert fl.fp8_linear_path(x.float(), q, s, device=CUDA) == "triton"
    assert fl.fp8_linear_path(x, q, s, b.float(), device=CUDA) == "triton"  # the epilogue adds bf16 biases
    wide = torch.cat([q, q], dim=1)[:, :256]  # a strided view: TMA needs contiguous rows
    assert fl.fp8_linear_path(x, wide, s, device=CUDA) == "triton"
    assert fl.fp8_linear_path(x, q, s.t().contiguous().t(), device=CUDA) == "triton"


def test_without_the_extension_the_cuda_knob_falls_back_to_triton(knob, hopper_without_cublas_recipe, monkeypatch):
    knob("cuda")
    monkeypatch.setattr(extension, "available_for", lambda device: False)
    x, q, s, _ = linear()
    assert fl.fp8_linear_path(x, q, s, device=CUDA) == "triton"
    assert fl.dense_fp8_path(CUDA) == "triton"


def test_the_launch_wrapper_checks_layouts_and_dtypes():
    x, q, s, b = linear(bias=True)
    with pytest.raises(ValueError, match="weight must be contiguous"):
        extension.dense_fp8_linear_cuda(x, torch.cat([q, q], dim=1)[:, :256], s)
    with pytest.raises(ValueError, match="x must be contiguous"):
        extension.dense_fp8_linear_cuda(x.t(), q, s)
    with pytest.raises(TypeError, match="x and bias must be bfloat16"):
        extension.dense_fp8_linear_cuda(x.float(), q, s)
    with pytest.raises(TypeError, match="x and bias must be bfloat16"):
        extension.dense_fp8_linear_cuda(x, q, s, b.float())


@pytest.mark.skipif(not extension.is_built(), reason="the _C extension is not built")
def test_the_binding_rejects_shapes_the_kernel_cannot_take():
    """Before any pointer is touched (they are 0 here): the C++ entry checks K, N and the workspace size."""
    C = extension._C
    assert hasattr(C, "dense_fp8_linear"), "the built _C predates csrc/moe/dense_fp8.cu: rebuild the extension"
    assert C.dense_fp8_workspace_bytes(0, 128) >= 0
    need = C.dense_fp8_workspace_bytes(7, 256)
    assert need >= 7 * 256 + 7 * 2 * 4 + 7 * 4 * 2  # x e4m3, its scales, sorted rows and weights
    with pytest.raises(ValueError, match="K a multiple of 128"):
        C.dense_fp8_workspace_bytes(7, 200)
    with pytest.raises(ValueError, match=r"N a multiple of 8, got M=7 K=256 N=196"):
        C.dense_fp8_linear(0, 0, 0, 0, 0, 7, 256, 196, 0, need, 0, 0)
    with pytest.raises(ValueError, match=r"K a multiple of 128 .*, got M=7 K=192 N=256"):
        C.dense_fp8_linear(0, 0, 0, 0, 0, 7, 192, 256, 0, need, 0, 0)
    with pytest.raises(ValueError, match="workspace smaller"):
        C.dense_fp8_linear(0, 0, 0, 0, 0, 7, 256, 256, 0, need - 1, 0, 0)
    with pytest.raises(ValueError, match=r"tiles must be -1 \(choose\), 0, 1 or 2"):
        C.dense_fp8_linear(0, 0, 0, 0, 0, 7, 256, 256, 0, need, 0, 0, tiles=3)
    with pytest.raises(ValueError, match="tiles='huge', want one of choose, decode, large, cluster"):
        extension.dense_fp8_linear_cuda(*linear()[:3], tiles="huge")


def test_the_decode_linear_is_on_unless_switched_off(monkeypatch):
    """Unset, Triton calls of few rows take the split-K decode kernel; STATICMOE_FP8_DECODE_LINEAR=0 keeps them on
    quantiser + block GEMM (read once)."""
    fl.decode_linear_enabled.cache_clear()
    monkeypatch.delenv("STATICMOE_FP8_DECODE_LINEAR", raising=False)
    try:
        assert fl.decode_linear_enabled() is True
        fl.decode_linear_enabled.cache_clear()
        monkeypatch.setenv("STATICMOE_FP8_DECODE_LINEAR", "0")
        assert fl.decode_linear_enabled() is False
    finally:
        fl.decode_linear_enabled.cache_clear()


@pytest.mark.parametrize("name, read", [("STATICMOE_FP8_DECODE_LINEAR", "decode_linear_enabled"),
                                        ("STATICMOE_ROUTER_FUSED", "fused_router_rows")])
def test_opt_in_switches_refuse_values_other_than_0_and_1(monkeypatch, name, read):
    from model.kernels import routing

    fn = getattr(fl, read, None) or getattr(routing, read)
    fn.cache_clear()
    try:
        monkeypatch.setenv(name, "yes")
        with pytest.raises(ValueError, match=f"{name}='yes': want 0 or 1"):
            fn()
        fn.cache_clear()
        monkeypatch.setenv(name, "0")
        assert not fn()  # False, or 0 rows
    finally:
        fn.cache_clear()
