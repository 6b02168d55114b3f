"""The compiled extension: present wherever a CUDA compiler is (CI must compile the sm_90a kernels on every run),
carrying sm_90 machine code, and its host-side entry points (launch configuration, workspace size, problem checks).
Needs no GPU."""

import os
import shutil
import struct

import pytest

from model.kernels import extension

EXPECTED_ENTRY_POINTS = (
    "task_map_decode_host", "task_map_build_device", "task_map_decode_all_device", "varlen_gemm_workspace_bytes",
    "varlen_gemm_bf16", "moe_workspace_bytes", "moe_launch_config", "moe_plan_layout", "moe_plan_device",
    "moe_plan_host", "moe_forward",
)


def nvcc_path() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    return "/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None


def test_extension_is_built_wherever_nvcc_exists():
    if nvcc_path() is None:
        pytest.skip("no CUDA compiler on this machine: the pure-torch path serves")
    assert extension.is_built(), (
        f"nvcc exists ({nvcc_path()}) but model.kernels._C did not import: {extension.IMPORT_ERROR!r}. "
        "CI must compile the sm_90a kernels: reinstall with `pip install --no-build-isolation --no-deps -e .`"
    )


needs_extension = pytest.mark.skipif(not extension.is_built(), reason="extension not built")
_C = extension._C


@needs_extension
def test_entry_points_exist():
    missing = [name for name in EXPECTED_ENTRY_POINTS if not hasattr(_C, name)]
    assert not missing, f"_C lacks {missing}"


def elf_sections(data: bytes) -> dict[str, tuple[int, int]]:
    """name -> (file offset, size) of a 64-bit little-endian ELF's sections."""
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, "not a 64-bit little-endian ELF"
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_at = headers[shstrndx][4]
    sections = {}
    for name_off, _type, _flags, _addr, offset, size in headers:
        end = data.index(b"\0", names_at + name_off)
        sections[data[names_at + name_off : end].decode()] = (offset, size)
    return sections


def fatbin_cubin_archs(blob: bytes) -> list[int]:
    """SM versions of the machine-code (cubin, kind 2) entries of the concatenated fatbins in `.nv_fatbin`."""
    archs, pos = [], 0
    while pos + 16 <= len(blob):
        magic, _version, header_size, fat_size = struct.unpack_from("<IHHQ", blob, pos)
        if magic != 0xBA55ED50:  # fatbins are 8-byte aligned; skip padding
            pos += 8
            continue
        entry, end = pos + header_size, pos + header_size + fat_size
        while entry < end:
            kind, _v, entry_header, payload = struct.unpack_from("<HHIQ", blob, entry)
            sm, = struct.unpack_from("<I", blob, entry + 28)
            if kind == 2:
                archs.append(sm)
            entry += entry_header + payload
        pos = end
    return archs


@needs_extension
def test_extension_carries_sm90a_machine_code():
    data = open(_C.__file__, "rb").read()
    sections = elf_sections(data)
    assert ".nv_fatbin" in sections, "the extension has no embedded CUDA fatbin: were the .cu files compiled?"
    offset, size = sections[".nv_fatbin"]
    blob = data[offset : offset + size]
    archs = fatbin_cubin_archs(blob)
    assert archs, "no cubin (machine code) in the fatbin"
    assert set(archs) == {90}, f"cubins for SM {sorted(set(archs))}, expected only sm_90(a)"
    assert b"sm_90a" in blob, "the device code was not compiled for the arch-specific target sm_90a"


@needs_extension
def test_launch_config_choices():
    """Chosen from shapes only: rows per tile a power of two (moe.h: 64 or 128), never shrinking as T grows,
    smaller for decode than for prefill; the plan's chunk count grows with T*k."""
    E, k, H, I = 128, 8, 2048, 768
    configs = [_C.moe_launch_config(T, k, E, H, I) for T in (0, 1, 7, 16, 64, 128, 513, 2048, 4096, 32768, 1 << 20)]
    for block_m, chunks in configs:
        assert block_m in (16, 32, 64, 128, 256), configs
        assert chunks >= 1, configs
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in zip(configs, configs[1:])), f"config shrank: {configs}"
    assert configs[1][0] < configs[-1][0], f"decode and prefill use the same tile height: {configs}"
    assert configs[-1][1] > configs[1][1], f"the plan does not split large routings into chunks: {configs}"
    assert _C.moe_launch_config(4096, k, E, H, I) == configs[8], "not a pure function of the shape"


@needs_extension
def test_workspace_grows_with_tokens_and_covers_the_intermediates():
    E, k, H, I = 64, 8, 2048, 1024
    sizes = [_C.moe_workspace_bytes(T, k, E, H, I) for T in (0, 1, 2, 16, 513, 4096, 65536)]
    assert all(a < b for a, b in zip(sizes, sizes[1:])), sizes
    for T in (1, 513, 4096):
        rows = T * k
        # at least the expert-sorted activations [T*k, I] and per-slot outputs [T*k, H] in 16-bit, plus row ids
        assert _C.moe_workspace_bytes(T, k, E, H, I) >= rows * (I + H) * 2 + rows * 4
    assert _C.moe_workspace_bytes(64, 8, E, H, 2 * I) > _C.moe_workspace_bytes(64, 8, E, H, I)
    assert _C.moe_workspace_bytes(64, 8, E, 2 * H, I) > _C.moe_workspace_bytes(64, 8, E, H, I)


@needs_extension
def test_plan_layout_fits_inside_the_workspace():
    for T, k, E in ((1, 8, 1024), (513, 6, 60), (4096, 2, 8)):
        size = _C.moe_workspace_bytes(T, k, E, 256, 128)
        layout = _C.moe_plan_layout(T, k, E, 256, 128)
        offsets = sorted(layout.values())
        assert len(set(offsets)) == len(offsets), f"overlapping plan arrays: {layout}"
        assert all(o % 16 == 0 for o in offsets), f"misaligned plan arrays: {layout}"
        assert layout["sorted_rows"] + 4 * T * k <= size
        assert layout["expert_offsets"] + 4 * (E + 1) <= size


@needs_extension
@pytest.mark.parametrize(
    "T,k,E,H,I",
    [(-1, 8, 64, 64, 64), (1, 0, 64, 64, 64), (1, 8, 0, 64, 64), (1, 8, 1025, 64, 64),
     (1, 8, 64, 12, 64), (1, 8, 64, 64, 12), (1, 8, 64, 0, 64)],
)
def test_invalid_problem_raises_value_error(T, k, E, H, I):
    for entry in (_C.moe_workspace_bytes, _C.moe_launch_config, _C.moe_plan_layout):
        with pytest.raises(ValueError, match="invalid MoE problem"):
            entry(T, k, E, H, I)


@needs_extension
def test_largest_valid_problem_is_accepted():
    assert _C.moe_workspace_bytes(1, 1, 1024, 8, 8) > 0
    assert _C.moe_launch_config(0, 1, 1, 8, 8)[0] in (64, 128)


@needs_extension
@pytest.mark.parametrize("value,tile_rows,warns", [(None, 256, False), ("0", 128, False), ("4096", 128, False),
                                                   ("512", 256, False), ("lots", 256, True), ("-5", 256, True)])
def test_cluster_threshold_knob(value, tile_rows, warns):
    """STATICMOE_CLUSTER_MIN_ROWS (read once per process, so each case runs in its own): 0 turns the 2-CTA cluster
    tiles off, a threshold above the shape's 2048 rows per expert too; nonsense is reported and ignored."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "STATICMOE_CLUSTER_MIN_ROWS"}
    if value is not None:
        env["STATICMOE_CLUSTER_MIN_ROWS"] = value
    code = "from model.kernels import _C; print(_C.moe_launch_config(8192, 2, 8, 4096, 14336)[0])"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert int(run.stdout.strip().splitlines()[-1]) == tile_rows
    assert ("ignoring STATICMOE_CLUSTER_MIN_ROWS" in run.stderr) == warns, run.stderr


def test_mainloop_microbenchmark_compiles_without_spills(tmp_path):
    """benchmarks/wgmma_rate.cu (gpu_check.sh wgmma-rate) builds from the kernels' headers for sm_90a, and none of its
    fourteen mainloop kernels (7 variants, with and without the writer warpgroup) spills: a spill would put
    local-memory traffic into the cycles per K step it reports. Nor does ptxas serialise their wgmmas (C7514): the
    pipelined variants exist to overlap promotion with wgmmas in flight."""
    import re
    import subprocess
    from pathlib import Path

    nvcc = nvcc_path()
    if nvcc is None:
        pytest.skip("no CUDA compiler on this machine")
    root = Path(__file__).resolve().parent.parent
    run = subprocess.run([nvcc, "-gencode=arch=compute_90a,code=sm_90a", "-O3", "-std=c++17", f"-I{root / 'csrc'}",
                          "-Xptxas", "-v", "-c", str(root / "benchmarks" / "wgmma_rate.cu"), "-o",
                          str(tmp_path / "wgmma_rate.o")], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    kernels = re.findall(r"Compiling entry function '(_Z\d*mainloop_kernel\w*)'", run.stderr)
    spills = [int(m) for m in re.findall(r"(\d+) bytes spill stores", run.stderr)]
    assert len(set(kernels)) == 14, kernels
    assert len(spills) >= 14 and not any(spills), run.stderr[-3000:]
    assert "C7514" not in run.stderr, run.stderr[-3000:]
