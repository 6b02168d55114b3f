"""FP8 serving on a Hopper GPU (pytest -m gpu): the dense FP8 linear's fast path (block `torch._scaled_mm`, or our
Triton kernel where cuBLAS refuses the recipe) against its reference at real shapes, our FP8 model (experts on the CUDA kernel) against the same model on the CPU reference,
greedy tokens over HTTP identical between a CPU server and a GPU server of one block-FP8 checkpoint, and the peak
device memory of loading a 30B model in FP8.

    pytest -m gpu tests/test_fp8_gpu.py -s      (-s prints the measured errors, timings and memory)
"""

import time

import pytest
import torch
import torch.nn.functional as F

from model.kernels.fp8 import FP8_DTYPE, quantize_fp8_blocks
from model.kernels.fp8_linear import dense_fp8_path, fp8_linear, fp8_linear_reference
from model.loader import load_model
from tests.fp8_fixtures import write_fp8_checkpoint
from tests.model_fixtures import PagedRunner, assert_gpu_within_cpu_bf16_spread
from tests.service_fixtures import ServerProcess
from tests.test_fp8_serve import greedy_over_http

pytestmark = pytest.mark.gpu

PROMPTS = [[5, 77, 203, 19, 150, 8], [42, 42, 7, 260, 99, 31, 4], [300, 1, 2, 3]]
# (K, N) of Qwen3-30B-A3B's dense linears: qkv_proj, o_proj; and Qwen2-57B-A14B's shared expert gate_up / down
# (256, 200): N not a multiple of 128 (a ragged last weight-scale row, tiles cut by the column mask)
LINEAR_SHAPES = [(2048, 5120), (4096, 2048), (3584, 40960), (20480, 3584), (256, 200)]


def timed_ms(fn, iters=50) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters * 1e3


@pytest.mark.parametrize("K, N", LINEAR_SHAPES)
@pytest.mark.parametrize("M", [1, 7, 64, 513])
def test_fp8_linear_fast_path_matches_reference(M, K, N):
    device = torch.device("cuda", torch.cuda.current_device())
    path = dense_fp8_path(device)
    print(f"dense FP8 path: {path}")
    assert path != "reference", "FP8 dense linears would dequantise the weight at every call"
    gen = torch.Generator(device="cuda").manual_seed(M * 7 + K)
    x = torch.randn(M, K, device="cuda", generator=gen).to(torch.bfloat16)
    w, s = quantize_fp8_blocks(torch.randn(N, K, device="cuda", generator=gen) / K**0.5)
    got = fp8_linear(x, w, s).float()
    want = fp8_linear_reference(x.float(), w, s).float()
    err = float((got - want).abs().max() / want.abs().max())
    bf16_w = (w.float() * s.repeat_interleave(128, 0).repeat_interleave(128, 1)[:N, :K]).to(torch.bfloat16)
    fp8_ms, bf16_ms = timed_ms(lambda: fp8_linear(x, w, s)), timed_ms(lambda: F.linear(x, bf16_w))
    print(f"M={M} K={K} N={N}: rel err {err:.2e}; fp8 {fp8_ms * 1e3:.1f} us vs bf16 F.linear {bf16_ms * 1e3:.1f} us")
    assert err < 1e-2  # bf16 output rounding (2^-8) plus float32 summation order


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory):
    return write_fp8_checkpoint("qwen3_moe", tmp_path_factory.mktemp("gpu_fp8"), seed=21)[0]


@pytest.mark.parametrize("family", ["qwen3_moe", "glm4_moe"])
def test_fp8_model_on_the_gpu_matches_the_cpu_reference(family, fp8_checkpoint, tmp_path):
    """bf16 activations on both: the GPU runs the FP8 MoE kernel and block scaled_mm, the CPU the references; their
    difference must stay within twice the CPU bf16 run's own distance from float32. (glm4_moe: FP8 shared experts,
    grouped sigmoid routing with its float32 correction bias, partial rotary.)"""
    checkpoint = fp8_checkpoint if family == "qwen3_moe" else write_fp8_checkpoint(family, tmp_path, seed=22)[0]
    prompt = PROMPTS[0] + PROMPTS[1]
    cpu32, _ = load_model(str(checkpoint), dtype=torch.float32)
    cpu16, _ = load_model(str(checkpoint), dtype=torch.bfloat16)
    gpu, _ = load_model(str(checkpoint), dtype=torch.bfloat16, device="cuda")
    assert gpu.moe_blocks()[0].experts.gate_up_proj.dtype == FP8_DTYPE
    assert_gpu_within_cpu_bf16_spread(cpu32, cpu16, gpu, prompt, "FP8 model")


def test_greedy_tokens_over_http_cpu_reference_equal_gpu_kernel(fp8_checkpoint):
    """Two servers of one FP8 checkpoint, both with bf16 activations: the CPU one runs the pure-torch references, the
    GPU one our FP8 kernel, block scaled_mm and CUDA graphs. FP8 amplifies any reordering of a sum (a value near an
    e4m3 rounding boundary moves a whole e4m3 step), so on these random nets a bf16 run differs from float32 by ~5%
    of the largest logit, and a token whose top-2 margin is below that may flip legitimately. So: at every step of
    each prompt's CPU greedy continuation (16 tokens, 12 prompts), both servers are asked for the next greedy token
    (prompt + the continuation so far, max_tokens 1), and must agree wherever the CPU model's margin exceeds 8% of
    its largest logit (on the CPU, bf16 against float32 only disagreed below 4%); at least 32 steps qualify."""
    cpu_model, tokenizer = load_model(str(fp8_checkpoint), dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    steps = []  # (prompt ids, expected next token text) at clear-margin steps
    for _ in range(12):
        prompt = torch.randint(0, cpu_model.config.vocab_size, (6,), generator=gen).tolist()
        runner = PagedRunner(cpu_model)
        logits = runner.step({"s": prompt})["s"][-1].float()
        for _ in range(16):
            top = logits.topk(2)
            token = int(top.indices[0])
            text = tokenizer.decode([token]) if token < tokenizer.vocab_size else ""
            # (a token that is part of a UTF-8 character streams as "" until the character completes: skipped)
            if float((top.values[0] - top.values[1]) / logits.abs().max()) > 0.08 and text and "\ufffd" not in text:
                steps.append((list(prompt), text))
            prompt.append(token)
            logits = runner.step({"s": [token]})["s"][-1].float()
    assert len(steps) >= 32, f"only {len(steps)} clear steps: the test model is too noisy to compare"
    servers = [ServerProcess(["--model", str(fp8_checkpoint), "--device", device, "--dtype", "bfloat16",
                              "--max-model-len", "64", "--served-model-name", "fp8"]) for device in ("cpu", "cuda")]
    try:
        for server in servers:
            server.wait_healthy(600)
        answers = [[greedy_over_http(s.base_url, "fp8", p, 1) for p, _ in steps] for s in servers]
    finally:
        for server in servers:
            server.stop()
    assert answers[0] == [text for _, text in steps]  # the CPU server is the in-process CPU model
    differ = [i for i, (a, b) in enumerate(zip(*answers)) if a != b]
    print(f"{len(steps)} clear steps compared, {len(differ)} differ")
    assert not differ, [(steps[i][0], answers[0][i], answers[1][i]) for i in differ]


def test_loading_30b_in_fp8_never_holds_a_bf16_model():
    """qwen3-30b-a3b quantised at load: the device peak stays the FP8 model plus about one high-precision
    parameter (one layer's experts, 0.6 GB in bf16), far below the 61 GB of the bf16 model."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model, _ = load_model("qwen3-30b-a3b", random_weights=True, dtype=torch.bfloat16, device="cuda",
                          quantization="fp8")
    peak = torch.cuda.max_memory_allocated() - base
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    largest = max(p.numel() for p in model.parameters() if p.dtype == FP8_DTYPE)
    print(f"FP8 qwen3-30b-a3b: weights {size / 2**30:.2f} GiB, peak at load {peak / 2**30:.2f} GiB")
    assert peak <= size + 2 * largest * 2 + (1 << 30)
    del model
    torch.cuda.empty_cache()


def test_glm_4_5_air_runs_in_fp8_on_one_h200():
    """The glm-4.5-air preset quantised at load fits one 141 GB H200 with room for a KV cache, and prefill and
    decode steps give finite logits (random weights: a smoke test of the real shapes, 46 layers, E=128, k=8)."""
    total = torch.cuda.get_device_properties(0).total_memory
    if total < 120 * 2**30:
        pytest.skip(f"needs an H200 (this GPU has {total / 2**30:.0f} GiB)")
    torch.cuda.empty_cache()
    model, _ = load_model("glm-4.5-air", random_weights=True, dtype=torch.bfloat16, device="cuda",
                          quantization="fp8")
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    runner = PagedRunner(model, num_blocks=64, block_size=16)
    logits = [runner.step({"s": list(range(1, 200))})["s"]] + [runner.step({"s": [7]})["s"] for _ in range(4)]
    free = torch.cuda.mem_get_info()[0]
    kv_per_token = model.kv_cache_bytes_per_block(16, torch.bfloat16) / 16
    print(f"glm-4.5-air FP8: weights {size / 1e9:.1f} GB, free after {free / 1e9:.1f} GB = "
          f"{free / kv_per_token / 1e3:.0f}k tokens of KV at {kv_per_token / 1e3:.0f} KB/token")
    assert size < 110e9 and free > 10e9
    assert all(torch.isfinite(x).all() for x in logits)
    del model, runner
    torch.cuda.empty_cache()
