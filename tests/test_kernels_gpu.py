"""GPU correctness of the CUDA path (pytest -m gpu, on an H100): the MoE op against a float32 reference over real
model shapes and adversarial routings, the device plan and task map against their host twins, CUDA-graph replay
with new routing, and the framework's second workload (varlen batched GEMM)."""

import pytest
import torch

from benchmarks.moe_cases import EXPERT_SHAPES, make_routing, relative_error
from model.kernels import extension, fused_moe, fused_moe_reference

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("cuda_moe_layer")]  # the CUDA kernels, at T = 1 too

TOKENS = (1, 7, 64, 513, 4096)
ROUTINGS = ("uniform", "zipf", "same", "sparse90")


@pytest.fixture(scope="module")
def weights_cache():
    cache = {}

    def get(name, dtype=torch.bfloat16):
        key = (name, dtype)
        if key not in cache:
            cache.clear()
            torch.cuda.empty_cache()
            E, k, H, I = EXPERT_SHAPES[name]
            g = torch.Generator(device="cuda").manual_seed(hash(name) % 1000)
            w13 = (torch.randn(E, 2 * I, H, device="cuda", generator=g) / H**0.5).to(dtype)
            w2 = (torch.randn(E, H, I, device="cuda", generator=g) / I**0.5).to(dtype)
            cache[key] = (w13, w2)
        return cache[key]

    return get


def run_poisoned(x, w13, w2, tw, ids, expert_load=None):
    """Our kernels with every output and scratch byte poisoned (0xFF = NaN in bf16/fp16) beforehand."""
    T, H = x.shape
    out = torch.full_like(x, float("nan"))
    ws = extension.moe_workspace(T, ids.shape[1], w13.shape[0], H, w2.shape[2], x.device)
    ws.fill_(0xFF)
    res = extension.fused_moe_cuda(x, w13, w2, tw, ids, expert_load, out=out, workspace=ws)
    torch.cuda.synchronize()
    return res


def check_against_fp32(x, w13, w2, tw, ids):
    out = run_poisoned(x, w13, w2, tw, ids)
    assert not out.isnan().any(), "unwritten or NaN outputs"
    ref32 = fused_moe_reference(x, w13, w2, tw, ids, compute_dtype=torch.float32)
    ref_lowp = fused_moe_reference(x, w13, w2, tw, ids)  # a same-precision pure-torch implementation
    err, err_lowp = relative_error(out, ref32), relative_error(ref_lowp, ref32)
    assert err <= 2 * err_lowp + 1e-4, f"relative error {err:.2e} vs pure-torch {x.dtype} {err_lowp:.2e}"
    return err


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("shape", list(EXPERT_SHAPES))
def test_moe_matches_fp32_reference(shape, T, routing, weights_cache):
    E, k, H, I = EXPERT_SHAPES[shape]
    w13, w2 = weights_cache(shape)
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)  # fresh data every run
    tw, ids = make_routing(routing, T, E, k, gen)
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    check_against_fp32(x, w13, w2, tw.cuda(), ids.cuda())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("E,k,H,I,T", [(6, 6, 264, 136, 97), (1024, 6, 256, 64, 300), (3, 1, 72, 200, 1), (16, 4, 1032, 520, 2000),
                                       (40, 11, 264, 136, 33)])  # k = 11: the combine reads slots in groups of 8
def test_odd_shapes_and_dtypes(E, k, H, I, T, dtype):
    w13 = (torch.randn(E, 2 * I, H, device="cuda") / H**0.5).to(dtype)
    w2 = (torch.randn(E, H, I, device="cuda") / I**0.5).to(dtype)
    tw, ids = make_routing("uniform", T, E, k, torch.Generator().manual_seed(T))
    x = torch.randn(T, H, device="cuda", dtype=dtype)
    check_against_fp32(x, w13, w2, tw.cuda(), ids.cuda())


@pytest.mark.parametrize("routing", ["zipf", "sparse90", "uniform"])
@pytest.mark.parametrize("E,k,H,I,T", [(8, 2, 264, 136, 4096), (5, 3, 136, 264, 1100)])
def test_cluster_path_with_odd_and_empty_halves(E, k, H, I, T, routing):
    """Shapes with >= 512 expected rows per expert run the 2-CTA cluster GEMMs (tile rows 256); skewed routing gives
    experts whose last 256-row unit has an empty second half, and tiny experts whose whole unit is one part."""
    from model.kernels import _C

    assert _C.moe_launch_config(T, k, E, H, I)[0] == 256, "shape no longer selects the cluster path"
    gen = torch.Generator().manual_seed(T + E)
    tw, ids = make_routing(routing, T, E, k, gen)
    counts = torch.bincount(ids.reshape(-1).long(), minlength=E)
    if routing == "zipf":
        assert ((counts % 256 > 0) & (counts % 256 <= 128)).any(), f"no expert with an empty half: {counts}"
    w13 = torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16) / H**0.5
    w2 = torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16) / I**0.5
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    check_against_fp32(x, w13, w2, tw.cuda(), ids.cuda())


def test_plan_matches_host_twin_and_counts_load():
    from model.kernels import _C

    # One-block plan (T*k <= 4096: 8, 3078 with E = 1024, exactly 4096 with out-of-range ids), chunked plan (4097,
    # 6000, 32768, 320000 entries: more than 1024 per chunk), and an expert with >= 256 M tiles (70000 rows: the
    # expert order's O(E) fallback).
    for T, k, E, routing in [(1, 8, 128, "zipf"), (513, 6, 1024, "zipf"), (512, 8, 128, "poisoned"),
                             (4097, 1, 64, "zipf"), (4096, 8, 64, "zipf"), (3000, 2, 8, "zipf"),
                             (40000, 8, 256, "zipf"), (70000, 2, 8, "same")]:
        gen = torch.Generator().manual_seed(T + E)
        _, ids = make_routing("zipf" if routing == "poisoned" else routing, T, E, k, gen)
        if routing == "poisoned":  # routed nowhere: skipped by the plan
            ids.view(-1)[torch.randperm(T * k, generator=gen)[:300]] = torch.tensor([-1, E, 1 << 20]).repeat(100).int()
        tile_rows, chunks = _C.moe_launch_config(T, k, E, 64, 64)
        assert (chunks == 1) == (T * k <= 4096), "plan path not as intended"
        if routing == "same":
            assert int(torch.bincount(ids.view(-1).long()).max()) >= 256 * tile_rows, "fallback not reached"
        ids_gpu = ids.cuda()
        H, I = 64, 64
        ws = extension.moe_workspace(T, k, E, H, I, "cuda").fill_(0xFF)
        load = torch.full((E,), 5, dtype=torch.int64, device="cuda")
        stream = torch.cuda.current_stream().cuda_stream
        _C.moe_plan_device(ids_gpu.data_ptr(), T, k, E, H, I, ws.data_ptr(), load.data_ptr(), stream)
        torch.cuda.synchronize()
        block_m, _ = _C.moe_launch_config(T, k, E, H, I)
        host = _C.moe_plan_host(ids.reshape(-1).tolist(), E, block_m)
        layout = _C.moe_plan_layout(T, k, E, H, I)

        def read(name, count):
            off = layout[name]
            return ws[off : off + 4 * count].view(torch.int32).tolist()

        n = host["num_slots"]
        assert read("num_slots", 1) == [n]
        for name, count in [("expert_counts", E), ("expert_offsets", E + 1), ("expert_order", E),
                            ("sorted_rows", len(host["sorted_rows"]))]:
            assert read(name, count) == host[name], name
        assert read("mtile_prefix", n) == host["mtile_prefix"]
        assert read("slot_expert", n) == host["slot_expert"]
        valid = ids[(ids >= 0) & (ids < E)].long()
        expected_load = torch.bincount(valid, minlength=E) + 5
        assert torch.equal(load.cpu(), expected_load)


def test_task_map_device_decoder_matches_host_twin():
    from model.kernels import _C

    gen = torch.Generator().manual_seed(7)
    for n_tasks, density in [(1, 1.0), (1024, 0.5), (4000, 0.001), (300, 0.9)]:
        counts = (torch.rand(n_tasks, generator=gen) < density).int() * torch.randint(1, 9, (n_tasks,), generator=gen).int()
        counts_gpu = counts.cuda()
        prefix = torch.full((n_tasks,), -7, dtype=torch.int32, device="cuda")
        slots = torch.full((n_tasks,), -7, dtype=torch.int32, device="cuda")
        num = torch.zeros(1, dtype=torch.int32, device="cuda")
        s = torch.cuda.current_stream().cuda_stream
        _C.task_map_build_device(counts_gpu.data_ptr(), n_tasks, prefix.data_ptr(), slots.data_ptr(), num.data_ptr(), s)
        total = int(counts.sum())
        out = torch.full((max(total, 1), 3), -9, dtype=torch.int32, device="cuda")
        _C.task_map_decode_all_device(prefix.data_ptr(), slots.data_ptr(), num.data_ptr(), total, out.data_ptr(), s)
        torch.cuda.synchronize()
        nonempty = counts.nonzero().flatten()
        assert int(num) == nonempty.numel()
        expected = [(slot, int(t), tile) for slot, t in enumerate(nonempty.tolist()) for tile in range(int(counts[t]))]
        assert [tuple(r) for r in out[:total].tolist()] == expected


def test_cuda_graph_replay_with_new_routing(weights_cache):
    E, k, H, I = EXPERT_SHAPES["qwen3-30b-a3b"]
    w13, w2 = weights_cache("qwen3-30b-a3b")
    T = 64
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    tw, ids = make_routing("uniform", T, E, k, torch.Generator().manual_seed(1))
    tw, ids = tw.cuda(), ids.cuda()
    load = torch.zeros(E, dtype=torch.int64, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fused_moe(x, w13, w2, tw, ids)  # warm-up outside capture (one-time attribute setup)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe(x, w13, w2, tw, ids, expert_load=load)
    replay_with_new_routings(graph, out, x, tw, ids, load, lambda: (
        fused_moe_reference(x, w13, w2, tw, ids, compute_dtype=torch.float32),
        fused_moe_reference(x, w13, w2, tw, ids)))


def replay_with_new_routings(graph, out, x, tw, ids, load, references):
    """Replay `graph` (it computes `out` from the static x, tw, ids and counts into `load`) with fresh x under four
    new routings: each time `out` within 2x the error of a same-precision pure-torch path (`references()` returns
    (float32 reference, that path) for the current inputs), and `load` the sum of the routed counts at the end."""
    T, k = ids.shape
    E = load.numel()
    load.zero_()
    expected_load = torch.zeros(E, dtype=torch.int64)
    for routing in ("zipf", "same", "sparse90", "uniform"):
        new_tw, new_ids = make_routing(routing, T, E, k, torch.Generator().manual_seed(len(routing)))
        tw.copy_(new_tw)
        ids.copy_(new_ids)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        ref32, same_precision = references()
        assert relative_error(out, ref32) <= 2 * relative_error(same_precision, ref32) + 1e-4, routing
        expected_load += torch.bincount(new_ids.reshape(-1).long(), minlength=E)
    assert torch.equal(load.cpu(), expected_load)


def test_deterministic_bitwise(weights_cache):
    E, k, H, I = EXPERT_SHAPES["olmoe-1b-7b"]
    w13, w2 = weights_cache("olmoe-1b-7b")
    tw, ids = make_routing("zipf", 2048, E, k, torch.Generator().manual_seed(3))
    x = torch.randn(2048, H, device="cuda", dtype=torch.bfloat16)
    a = fused_moe(x, w13, w2, tw.cuda(), ids.cuda())
    b = fused_moe(x, w13, w2, tw.cuda(), ids.cuda())
    assert torch.equal(a, b)


def test_varlen_gemm_every_task_its_own_mnk():
    from model.kernels import varlen_gemm

    gen = torch.Generator().manual_seed(11)
    shapes = [(int(m), int(n), int(k)) for m, n, k in torch.randint(0, 300, (200, 3), generator=gen)]
    shapes += [(0, 64, 64), (1, 1, 1), (1000, 8, 3)]
    a = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for m, n, k in shapes]
    b = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for m, n, k in shapes]
    outs = varlen_gemm(a, b)
    for ai, bi, ci in zip(a, b, outs):
        ref = ai.double() @ bi.double().t()
        assert ci.shape == ref.shape
        if ref.numel():
            assert relative_error(ci, ref) < 1e-2
