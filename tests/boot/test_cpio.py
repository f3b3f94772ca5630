"""The credential initrd is a newc cpio that GNU cpio (and so the kernel) unpacks."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest

from lpmosd.boot.cpio import SECRET_PATH, Entry, credential_archive, write_newc


def test_gnu_cpio_unpacks_the_credential(tmp_path: Path) -> None:
    archive = credential_archive("lpe_secret-value")
    assert len(archive) % 4 == 0
    subprocess.run(
        ["cpio", "-i", "--make-directories", "--quiet", "--no-absolute-filenames"],
        input=archive,
        cwd=tmp_path,
        check=True,
    )
    secret = tmp_path / SECRET_PATH
    assert secret.read_bytes() == b"lpe_secret-value"  # no newline
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    listing = subprocess.run(
        ["cpio", "-t", "-v", "--quiet"], input=archive, capture_output=True, check=True
    ).stdout.decode()
    names = [line.split()[-1] for line in listing.splitlines()]
    assert names == ["etc", "etc/lpmosd", SECRET_PATH]
    assert listing.splitlines()[2].startswith("-rw-------")


@pytest.mark.parametrize("path", ["/etc/x", "etc/../x", "../x"])
def test_member_paths_stay_relative(path: str) -> None:
    with pytest.raises(ValueError):
        write_newc([Entry(path, 0o600, b"x")])
