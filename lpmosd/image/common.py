"""What both image builders share: running mmdebstrap, hashing, the build cache."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = [
    "BUILDER_VERSION",
    "DEFAULT_SOURCE_DATE_EPOCH",
    "DEFAULT_SUITE",
    "BuildError",
    "BuildOptions",
    "apt_mirror",
    "cache_key",
    "mmdebstrap",
    "run",
    "sha256_file",
    "write_sha256",
]

log = logging.getLogger("lpmosd.image")

#: Bumped whenever a builder's output changes for the same package lists (cache key).
BUILDER_VERSION: Final = "3"
DEFAULT_SUITE: Final = "bookworm"
#: 2026-01-01: file times inside the images, unless SOURCE_DATE_EPOCH says otherwise.
DEFAULT_SOURCE_DATE_EPOCH: Final = 1767225600
#: Documentation and translations are left out of every image (the copyright files stay).
DPKG_EXCLUDES: Final = (
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
    "path-exclude=/usr/share/lintian/*",
)


class BuildError(RuntimeError):
    """A build step failed; the message says which and why."""


@dataclass(frozen=True, slots=True, kw_only=True)
class BuildOptions:
    """Where and what to build from.

    ``mirror`` None: the Debian mirror apt on this machine uses. ``cache_dir`` None: no
    cache (always build).
    """

    output: Path
    suite: str = DEFAULT_SUITE
    mirror: str | None = None
    cache_dir: Path | None = None
    source_date_epoch: int = DEFAULT_SOURCE_DATE_EPOCH


def run(argv: Sequence[str | Path], *, env: Mapping[str, str] | None = None) -> None:
    """Run a build tool; its output goes to our stderr. Raises BuildError on failure."""
    args = [str(a) for a in argv]
    log.info("running %s", " ".join(args[:6]) + (" ..." if len(args) > 6 else ""))
    try:
        subprocess.run(args, check=True, env=None if env is None else {**os.environ, **env})
    except FileNotFoundError as exc:
        raise BuildError(f"{args[0]} is not installed ({exc})") from None
    except subprocess.CalledProcessError as exc:
        raise BuildError(f"{args[0]} failed with exit code {exc.returncode}") from None


_URI_RE: Final = re.compile(r"^(?:URIs:\s*|deb\s+(?:\[[^\]]*\]\s+)?)(\S+)", re.MULTILINE)


def apt_mirror(sources: Path = Path("/etc/apt")) -> str:
    """The first Debian archive URL in apt's sources (not the security archive)."""
    files = sorted(sources.glob("sources.list.d/*.sources")) + sorted(
        sources.glob("sources.list.d/*.list")
    )
    files.insert(0, sources / "sources.list")
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        for uri in _URI_RE.findall(text):
            if "security" not in uri:
                return str(uri).rstrip("/")
    return "http://deb.debian.org/debian"


def mmdebstrap(
    opts: BuildOptions,
    packages: Sequence[str],
    target: Path,
    *,
    hooks: Sequence[str] = (),
    variant: str = "minbase",
) -> None:
    """Bootstrap ``opts.suite`` with ``packages`` into ``target`` (a dir or a tarball)."""
    mirror = opts.mirror or apt_mirror()
    argv: list[str | Path] = [
        "mmdebstrap",
        f"--variant={variant}",
        "--include=" + ",".join(packages),
        "--aptopt=APT::Install-Recommends false",
    ]
    argv += [f"--dpkgopt={opt}" for opt in DPKG_EXCLUDES]
    argv += hooks
    argv += [opts.suite, target, mirror]
    run(argv, env={"SOURCE_DATE_EPOCH": str(opts.source_date_epoch)})


def cache_key(kind: str, opts: BuildOptions, packages: Sequence[str], *extra: str) -> str:
    """A key naming everything a build's output depends on."""
    doc = {
        "kind": kind,
        "builder": BUILDER_VERSION,
        "suite": opts.suite,
        "mirror": opts.mirror or apt_mirror(),
        "packages": sorted(packages),
        "epoch": opts.source_date_epoch,
        "extra": list(extra),
    }
    digest = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
    return f"{kind}-{digest[:16]}"


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_sha256(path: Path) -> str:
    """Write ``<path>.sha256`` in sha256sum format; returns the hex digest."""
    digest = sha256_file(path)
    path.with_name(path.name + ".sha256").write_text(f"{digest}  {path.name}\n")
    return digest


def copy_outputs(src: Path, dst: Path, names: Sequence[str]) -> None:
    """Copy built files (and their .sha256) from ``src`` to ``dst``, atomically each."""
    for name in names:
        for n in (name, name + ".sha256"):
            target = dst / n
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".part")
            shutil.copyfile(src / n, tmp)
            tmp.replace(target)


def timed(label: str, started: float) -> None:
    """Log how long a build part took."""
    log.info("%s took %.1f s", label, time.monotonic() - started)
