#!/usr/bin/env python
"""The Triton paged decode attention (model/layers/triton_decode_attention.py) at small batches against its byte
floor (issue 21, item 3): is its split of the keys and its grid right at batch 1 and short contexts?

Floor: the K and V bytes of the visible keys (batch × context × KV heads × head_dim × 2 × dtype bytes) over the
device-copy bandwidth measured in the same run. At batch 1 and a few thousand keys that is ~1 µs, below a launch, so
the table also shows the kernel against an empty Triton launch replayed the same way (the launch floor). Each point
is timed inside a CUDA graph (as the decode step runs it), the block table `width` as the engine's graphs pad it
(the next power of two of the context's blocks, at least 8), with the split `choose_splits` takes and with every
other power-of-two split, so a better rule shows as a row beating the chosen one.

    python benchmarks/bench_decode_attention.py [--batch 1,4,64] [--context 128,512,2048,8192]
"""

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script
    sys.path.insert(0, str(REPO))

from benchmarks.bench_timing import Timer, copy_bandwidth_gbps, graph_ms  # noqa: E402
from model.engine.model_runner import MIN_GRAPH_WIDTH  # noqa: E402
from model.layers.triton_decode_attention import choose_splits, paged_decode_attention  # noqa: E402
from model.layers.triton_paged import triton  # noqa: E402

# name: (query heads, KV heads, head_dim) of the presets' attention
MODELS = {"olmoe-1b-7b": (16, 16, 128), "qwen3-30b-a3b": (32, 4, 128), "gpt-oss-20b": (64, 8, 64)}
PAGE = 16

if triton is not None:
    @triton.jit
    def _empty_kernel(x_ptr):
        pass


def case(batch, context, hq, hkv, d, device, gen):
    blocks = -(-context // PAGE)
    width = max(MIN_GRAPH_WIDTH, 1 << (blocks - 1).bit_length())  # the engine's graph buckets
    num_blocks = batch * blocks + 1
    tables = torch.zeros(batch, width, dtype=torch.int32)
    tables[:, :blocks] = (torch.randperm(num_blocks - 1, generator=gen)[: batch * blocks] + 1).view(batch, blocks)
    k = torch.randn(num_blocks, PAGE, hkv, d, generator=gen).to(device, torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(batch, hq, d, generator=gen).to(device, torch.bfloat16)
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    return q, k, v, tables.to(device), lens


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--batch", default="1,4,64")
    p.add_argument("--context", default="128,512,2048,8192")
    args = p.parse_args(argv)
    device = torch.device("cuda")
    gbps = copy_bandwidth_gbps(Timer(device, 200.0, 3, 50), 1 << 30)["gbps"]
    dummy = torch.empty(1, device=device)
    launch_us = 1e3 * graph_ms(lambda: _empty_kernel[(1,)](dummy))
    print(f"{torch.cuda.get_device_name()}: copy {gbps:.0f} GB/s, an empty Triton launch {launch_us:.1f} us in a graph")
    gen = torch.Generator().manual_seed(0)
    for name in args.models.split(","):
        hq, hkv, d = MODELS[name]
        for batch in (int(b) for b in args.batch.split(",")):
            for context in (int(c) for c in args.context.split(",")):
                q, k, v, tables, lens = case(batch, context, hq, hkv, d, device, gen)
                floor_us = batch * context * hkv * d * 2 * 2 / (gbps * 1e3)
                chosen = choose_splits(batch, hkv, tables.shape[1] * PAGE, device, 64 if d <= 128 else 32)
                times = {}
                for splits in sorted({1, 2, 4, 8, 16, 32, 64, chosen}):
                    if splits > -(-tables.shape[1] * PAGE // 64) * 2:
                        continue
                    fn = lambda s=splits: paged_decode_attention(q, k, v, tables, lens, d ** -0.5, None, s)  # noqa: E731
                    times[splits] = 1e3 * graph_ms(fn)
                best = min(times, key=times.get)
                print(f"{name:>14} B={batch:<3} ctx={context:<5} width={tables.shape[1]:<4} floor {floor_us:6.1f} us | "
                      f"chosen {chosen:>2} splits {times[chosen]:6.1f} us ({times[chosen] / floor_us:5.1f}x floor, "
                      f"{times[chosen] / launch_us:4.1f} launches) | best {best:>2}: {times[best]:6.1f} us | "
                      + " ".join(f"{s}:{t:.1f}" for s, t in times.items()), flush=True)


if __name__ == "__main__":
    main()
