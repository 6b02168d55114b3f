"""The safetensors files of a checkpoint directory: which tensors exist, in which file, with which shape and dtype.

Only safetensors is ever read (never pickle). Headers are read up front (safetensors also checks that a file holds
every byte its header promises), so every problem — a missing or corrupt file, a key listed in the index but absent
from its file, a key in two files, an unusable dtype — is reported at start-up with the file and key, before any
weight is copied.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3"}  # F8_E4M3: block-FP8 weights (model/fp8_checkpoint.py)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
MXFP4_SUFFIXES = ("_blocks", "_scales")  # uint8 MXFP4 codes and e8m0 scales (model/mxfp4.py)


class CheckpointError(ValueError):
    """A checkpoint we refuse to load; the message names the file and, where one is at fault, the key."""


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name: "BF16", "F32", ...


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as err:  # safetensors raises its own error types for bad headers and short files
        raise CheckpointError(f"corrupt safetensors file {path}: {err}") from err


def _header(path: Path) -> dict[str, TensorInfo]:
    with _open(path) as f:
        infos = {}
        for key in f.keys():
            piece = f.get_slice(key)
            infos[key] = TensorInfo(path, tuple(piece.get_shape()), piece.get_dtype())
    return infos


def _files_from_index(directory: Path) -> tuple[list[Path], dict[str, str]]:
    index_path = directory / INDEX_FILE
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
        bad = next(((k, v) for k, v in weight_map.items() if not isinstance(v, str)), None)
        if bad is not None:
            raise TypeError(f"weight_map places {bad[0]!r} in {bad[1]!r}, not a file name")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"unreadable checkpoint index {index_path}: {err!r}") from err
    files = []
    for name in dict.fromkeys(weight_map.values()):
        path = directory / name
        if Path(name).name != name or not path.is_file():
            raise CheckpointError(f"{index_path} lists shard {name!r}, which is not a file in {directory}")
        files.append(path)
    return files, weight_map


class SafetensorsCheckpoint:
    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        weight_map = None
        if (self.directory / INDEX_FILE).is_file():
            files, weight_map = _files_from_index(self.directory)
        else:
            files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            pickles = [p.name for p in self.directory.iterdir() if p.suffix in PICKLE_SUFFIXES]
            hint = f" (found {', '.join(sorted(pickles))}: pickle checkpoints are never loaded)" if pickles else ""
            raise CheckpointError(f"no *.safetensors files in {self.directory}{hint}")
        self.tensors: dict[str, TensorInfo] = {}
        for path in files:
            for key, info in _header(path).items():
                if key in self.tensors:
                    raise CheckpointError(f"tensor {key!r} is in both {self.tensors[key].file} and {path}")
                if info.dtype not in FLOAT_DTYPES and not (info.dtype == "U8" and key.endswith(MXFP4_SUFFIXES)):
                    raise CheckpointError(f"tensor {key!r} in {path} has dtype {info.dtype}; only floating-point "
                                          f"{sorted(FLOAT_DTYPES)} weights are supported")
                self.tensors[key] = info
        if weight_map is not None:
            for key, name in weight_map.items():
                info = self.tensors.get(key)
                if info is None or info.file.name != name:
                    raise CheckpointError(f"{self.directory / INDEX_FILE} places {key!r} in {name}, "
                                          f"but {self.directory / name} has no such tensor")

    def read(self, keys: list[str]):
        """Yield (key, tensor) for `keys`, opening each file once."""
        by_file: dict[Path, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.tensors[key].file, []).append(key)
        for path, file_keys in by_file.items():
            with _open(path) as f:
                for key in file_keys:
                    try:
                        tensor: torch.Tensor = f.get_tensor(key)
                    except Exception as err:
                        raise CheckpointError(f"cannot read {key!r} from {path}: {err}") from err
                    yield key, tensor

    def read_slices(self, requests: list[tuple[str, tuple[slice, ...]]]):
        """Yield (position in `requests`, tensor) for each (key, slices), reading only those slices (safetensors
        get_slice) and opening each file once: a rank of a parallel model reads its part of a tensor, never all."""
        by_file: dict[Path, list[int]] = {}
        for position, (key, _) in enumerate(requests):
            by_file.setdefault(self.tensors[key].file, []).append(position)
        for path, positions in by_file.items():
            with _open(path) as f:
                for position in positions:
                    key, index = requests[position]
                    try:
                        tensor: torch.Tensor = f.get_slice(key)[index] if index else f.get_tensor(key)
                    except Exception as err:
                        raise CheckpointError(f"cannot read {key!r}{list(index)} from {path}: {err}") from err
                    yield position, tensor
