"""The rendered iPXE scripts: golden files, and no way to inject iPXE syntax."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lpmosd.boot.decision import Reason
from lpmosd.boot.scripts import InstallBoot, entry_script, install_script, local_script
from lpmosd.errors import ValidationError

GOLDEN = Path(__file__).parent / "golden"
BASE = "http://10.0.2.100"


def check_golden(name: str, text: str) -> None:
    """Compare with ``golden/name``; ``LPMOSD_UPDATE_GOLDEN=1`` rewrites it instead."""
    path = GOLDEN / name
    if os.environ.get("LPMOSD_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert text == path.read_text(), f"{name} differs from its golden file"


def test_entry_script_golden() -> None:
    check_golden("entry.ipxe", entry_script(BASE))


def test_install_script_golden() -> None:
    boot = InstallBoot(base_url=BASE, sn="sn-001", mac="52-54-00-12-34-56", task_id="t-abc123")
    check_golden("install.ipxe", install_script(boot))


@pytest.mark.parametrize("reason", list(Reason))
def test_local_script_golden(reason: Reason) -> None:
    if reason is Reason.INSTALL:
        return
    check_golden(f"local-{reason.name.lower()}.ipxe", local_script(reason.value))


def test_install_script_never_holds_a_secret() -> None:
    text = install_script(InstallBoot(base_url=BASE, sn="s1", mac="52:54:00:00:00:01", task_id="t"))
    assert "lpe_" not in text and "secret" not in text
    assert "initrd=credentials.cpio" in text


@pytest.mark.parametrize(
    "url",
    [
        "http://host/x ${secret}",
        "http://host\nshell",
        "http://host/a||b",
        "ftp://host",
        "http://user@host",
        "http://host/?q=1",
        "http://host:99999999",
        "",
    ],
)
def test_base_url_with_ipxe_syntax_is_refused(url: str) -> None:
    with pytest.raises(ValidationError):
        entry_script(url)


@pytest.mark.parametrize(
    "url", ["http://10.0.2.100", "https://pxe.dc1.example:8443/lpmosd/", "http://[fd00::1]:8081"]
)
def test_plain_base_urls_render(url: str) -> None:
    assert f"chain --autofree {url.rstrip('/')}/boot/" in entry_script(url)


@pytest.mark.parametrize(
    ("field", "boot"),
    [
        ("sn", InstallBoot(base_url=BASE, sn="a b", mac="52:54:00:00:00:01", task_id="t")),
        ("task_id", InstallBoot(base_url=BASE, sn="s", mac="52:54:00:00:00:01", task_id="${x}")),
        ("mac", InstallBoot(base_url=BASE, sn="s", mac="52:54:00:00:00", task_id="t")),
    ],
)
def test_install_script_refuses_odd_values(field: str, boot: InstallBoot) -> None:
    with pytest.raises(ValidationError) as info:
        install_script(boot)
    assert info.value.field == field


def test_local_script_refuses_free_text() -> None:
    with pytest.raises(ValidationError):
        local_script("x\nchain http://evil/")
