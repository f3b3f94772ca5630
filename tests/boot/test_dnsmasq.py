"""``lpmosd boot dnsmasq-config``: the drop-in passes ``dnsmasq --test``."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from lpmosd.boot.dnsmasq import DnsmasqOptions, render
from lpmosd.cli import main
from lpmosd.errors import ValidationError

DNSMASQ = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"


def dnsmasq_test(conf: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DNSMASQ, "--test", f"--conf-file={conf}"], capture_output=True, text=True, check=False
    )


def test_cli_output_passes_dnsmasq_test(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The loopback's network is read from the interface (127.0.0.0).
    assert main(["boot", "dnsmasq-config", "--interface", "lo", "--regional-url",
                 "http://127.0.0.1:8081"]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "dhcp-range=127.0.0.0,proxy" in text
    conf = tmp_path / "lpmosd.conf"
    conf.write_text(text)
    result = dnsmasq_test(conf)
    assert result.returncode == 0, result.stderr
    assert "syntax check OK" in result.stdout + result.stderr


def test_every_architecture_gets_ipxe_then_the_script(tmp_path: Path) -> None:
    text = render(
        DnsmasqOptions(
            interface="eth1", subnet="10.20.0.0", regional_url="http://10.20.0.5:8081",
            snponly=True,
        )
    )  # fmt: skip
    for csa, binary in (("x86PC", "undionly.kpxe"), ("X86-64_EFI", "snponly.efi")):
        assert f"pxe-service=tag:!ipxe,{csa}," in text and f",{binary}\n" in text
        assert (
            f'pxe-service=tag:ipxe,{csa},"lpmosd: boot script",http://10.20.0.5:8081/boot.ipxe'
            in text
        )
    conf = tmp_path / "lpmosd.conf"
    conf.write_text(text)
    assert dnsmasq_test(conf).returncode == 0
    # The check can fail: a mangled option is refused.
    conf.write_text(text.replace("dhcp-range=", "dhcp-rnage="))
    assert dnsmasq_test(conf).returncode != 0


@pytest.mark.parametrize(
    ("field", "opts"),
    [
        ("interface", DnsmasqOptions("eth0\nport=53", "10.0.0.0", "http://h")),
        ("subnet", DnsmasqOptions("eth0", "10.0.0.0/8", "http://h")),
        ("url", DnsmasqOptions("eth0", "10.0.0.0", "http://h/\nenable-ra")),
    ],
)
def test_values_cannot_inject_options(field: str, opts: DnsmasqOptions) -> None:
    with pytest.raises(ValidationError) as info:
        render(opts)
    assert info.value.field == field


def test_cli_refuses_a_missing_interface(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["boot", "dnsmasq-config", "--interface", "nosuch0", "--regional-url", "http://h"])
    assert code == 2 and "interface" in capsys.readouterr().err
