"""FP8 weights of a block-FP8 checkpoint that are served in high precision: dequantised once, at load.

Which: the weights of ALWAYS_HIGH_PRECISION linears (model/quantization.py), i.e. MLA's kv_b_proj, which
DeepSeek-V3/R1's FP8 checkpoints store in FP8 like every other linear. The absorbed decode multiplies its per-head
views W_UK / W_UV itself (model/layers/mla_attention.py) and the prefill decompresses the cached latents through
it, so it stays one high-precision matrix. Dequantising on every use instead would re-read the FP8 weight and write
a bf16 copy per layer and step (DeepSeek-V3: ~3 GB of traffic per decode step over 61 layers) for a weight that is
small: [heads·(nope + v), kv_lora_rank] = [32768, 512] per V3 layer, 32 MiB in bf16 against 16 MiB in FP8, so
about 1 GB more over V3's 61 layers (0.15% of its 674 GB of weights in FP8); V2-Lite [4096, 512], 113 MB in all.
vLLM and SGLang likewise dequantise kv_b_proj at load to build their absorbed weights.

Numerics: value = fp8 × its 128x128 block's scale in float32 (`model.kernels.fp8.dequantize_fp8_blocks`, one IEEE
product per element, so exactly the float32 rounding of the exact value; a bf16 or f16 scale upcasts exactly); the
loader's copy into the parameter then rounds once more, to the model dtype.

`Fp8DequantizedCheckpoint` wraps a SafetensorsCheckpoint (as model/mxfp4.py does for MXFP4): each such FP8 tensor
reads as a float32 tensor of its shape and its `_scale_inv` disappears, so weight loading (model/weight_map.py)
sees an ordinary high-precision tensor. The checkpoint's scales are checked before (model/fp8_checkpoint.py).
"""

import logging

import torch
from torch import nn

from model.checkpoint import CheckpointError, SafetensorsCheckpoint, TensorInfo
from model.kernels.fp8 import dequantize_fp8_blocks
from model.layers.linear import Linear
from model.quantization import ALWAYS_HIGH_PRECISION
from model.weight_map import FP8_DTYPE_NAME, SCALE_SUFFIX, check_fp8_codes, rename_keys

logger = logging.getLogger(__name__)


class Fp8DequantizedCheckpoint:
    """`checkpoint` with the FP8 tensors `keys` (checkpoint keys) read as float32, their scales hidden."""

    def __init__(self, checkpoint: SafetensorsCheckpoint, keys: list[str]):
        self.inner = checkpoint
        self.directory = checkpoint.directory
        self.dequantized = set(keys)
        hidden = {key + SCALE_SUFFIX for key in keys}
        self.tensors: dict[str, TensorInfo] = {}
        for key, info in checkpoint.tensors.items():
            if key in self.dequantized:
                self.tensors[key] = TensorInfo(info.file, info.shape, "F32")
            elif key not in hidden:
                self.tensors[key] = info

    def read(self, keys: list[str]):
        """Yield (key, tensor) for `keys`; a dequantised key yields its float32 value."""
        yield from self.inner.read([k for k in keys if k not in self.dequantized])
        for key in keys:
            if key in self.dequantized:
                stored = dict(self.inner.read([key, key + SCALE_SUFFIX]))
                check_fp8_codes(stored[key], key, self.inner.tensors[key].file)  # a NaN would dequantise silently
                try:
                    value = dequantize_fp8_blocks(stored[key], stored[key + SCALE_SUFFIX], torch.float32)
                except ValueError as err:  # the scales were checked at start-up; a file changed since
                    raise CheckpointError(f"tensor {key!r} in {self.inner.tensors[key].file}: {err}") from err
                yield key, value

    def read_slices(self, requests):
        raise CheckpointError(f"{self.directory}: a block-FP8 checkpoint with dequantised weights is loaded whole "
                              f"(no sharded reads)")


def dequantize_at_load(plain: nn.Module, checkpoint: SafetensorsCheckpoint,
                       renames) -> SafetensorsCheckpoint | Fp8DequantizedCheckpoint:
    """`checkpoint`, wrapped when it stores a weight of one of `plain`'s ALWAYS_HIGH_PRECISION linears in FP8."""
    original = rename_keys(checkpoint.tensors, renames)  # our key -> checkpoint key
    keys = []
    for name, module in plain.named_modules():
        if isinstance(module, Linear) and name.rsplit(".", 1)[-1] in ALWAYS_HIGH_PRECISION:
            key = original.get(name + ".weight")
            if key is not None and checkpoint.tensors[key].dtype == FP8_DTYPE_NAME:
                keys.append(key)
    if not keys:
        return checkpoint
    logger.info("%s: %d FP8 weight(s) read in high precision, dequantised at load (e.g. %s)", checkpoint.directory,
                len(keys), keys[0])
    return Fp8DequantizedCheckpoint(checkpoint, keys)
