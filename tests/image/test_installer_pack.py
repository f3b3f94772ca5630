"""The installer initrd's packing: another initrd appended to it must start where the
kernel looks for one (a 4-byte boundary), as UEFI's stub appends them without padding."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from lpmosd.image.installer import _pack

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("cpio", "zstd")), reason="needs cpio and zstd"
)


@pytest.mark.parametrize("size", [0, 1, 2, 3, 5, 1000])
def test_packed_initrd_ends_on_a_four_byte_boundary(tmp_path: Path, size: int) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "file").write_bytes(bytes(range(256)) * 4 + b"x" * size)
    out = tmp_path / "initrd"
    _pack(root, out, 0)
    data = out.read_bytes()
    assert len(data) % 4 == 0
    # What follows the zstd frame is at most 3 zero bytes, which the kernel skips.
    frames = [data[: len(data) - pad] for pad in range(4) if not any(data[len(data) - pad :])]
    unpacked = [
        subprocess.run(["zstd", "-dc"], input=frame, capture_output=True).stdout for frame in frames
    ]
    assert any(u.endswith(b"\0") and b"TRAILER!!!" in u for u in unpacked)
