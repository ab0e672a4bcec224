"""The CUDA extension compiles without a GPU (CI builds it with FASTGRAD_FORCE_CUDA=1) for the asked architectures."""

import os
import struct

import pytest

FATBIN_MAGIC = 0xBA55ED50
EXPECT = os.environ.get("FASTGRAD_EXPECT_CUDA_BUILD") == "1"  # set by .ci/run: then a missing build fails


def fatbin_architectures(path: str) -> set[tuple[str, int]]:
    """``{("elf" | "ptx", sm)}`` of every fat binary embedded in a shared object.

    A fatbin is a 16-byte header (magic, version, header size, payload size)
    followed by entries whose headers hold the kind (1 PTX, 2 ELF cubin) and,
    at byte 28, the SM version (80 = sm_80).
    """
    data = open(path, "rb").read()
    found = set()
    start = data.find(struct.pack("<I", FATBIN_MAGIC))
    while start >= 0:
        _, header_size, fat_size = struct.unpack_from("<HHQ", data, start + 4)
        off, end = start + header_size, start + header_size + fat_size
        while off < end:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, off)
            (arch,) = struct.unpack_from("<I", data, off + 28)
            found.add(({1: "ptx", 2: "elf"}.get(kind, str(kind)), arch))
            off += entry_header + payload
        start = data.find(struct.pack("<I", FATBIN_MAGIC), end)
    return found


def expected_archs() -> set[int]:
    raw = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0").replace(",", ";").replace(" ", ";")
    return {int(a.removesuffix("+PTX").replace(".", "").rstrip("a")) for a in raw.split(";") if a}


def test_cuda_extension_contains_requested_architectures():
    try:
        from fastgrad import _cuda
    except ImportError as e:
        if EXPECT:
            raise AssertionError(f"FASTGRAD_EXPECT_CUDA_BUILD=1 but fastgrad._cuda is missing: {e}") from e
        pytest.skip(f"fastgrad._cuda not built here ({e}); build with FASTGRAD_FORCE_CUDA=1")
    archs = fatbin_architectures(_cuda.__file__)
    elf = {sm for kind, sm in archs if kind == "elf"}
    assert expected_archs() <= elf, f"cubins for {sorted(elf)}, wanted {sorted(expected_archs())}"
    assert _cuda.chunk_size() == 1 << 16


def test_cuda_backend_refuses_cpu_tensors_with_a_reason():
    import torch

    from fastgrad.backends import get_backend

    reason = get_backend("cuda").why_not(torch.device("cpu"), torch.float32)
    assert reason and "CUDA tensors" in reason
