"""The OS types an IDC's regional can install, published in etcd for the control plane.

The regional writes ``/os/{idc}/os-types`` when it starts (and again when what it can
install changes): its plans, minus those whose OS image is missing from the artifacts
directory. The control plane checks ``os_type`` against it on ``POST /api/v1/tasks``, so a
task its regional cannot install is refused up front (400 naming ``os_type`` with the
choices) instead of failing after approval; the dashboard offers the same choices.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Self

from lpmosd.errors import ValidationError
from lpmosd.plan import Plan
from lpmosd.timestamps import format_ts, parse_ts


@dataclass(frozen=True, slots=True, kw_only=True)
class OsTypes:
    """The stored document: which OS types one IDC's regional offers, and since when."""

    os_types: tuple[str, ...]
    published_at: datetime
    regional_url: str = ""

    def to_json(self) -> str:
        """The stored JSON."""
        obj: dict[str, Any] = {
            "os_types": list(self.os_types),
            "published_at": format_ts(self.published_at),
            "regional_url": self.regional_url,
        }
        return json.dumps(obj, separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, data: bytes | str) -> Self:
        """Parse a stored document; ValidationError when it is not one."""
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise ValidationError("stored os-types is not JSON", field="os_types") from None
        if not isinstance(obj, dict):
            raise ValidationError("stored os-types is not an object", field="os_types")
        names = obj.get("os_types")
        when = obj.get("published_at")
        url = obj.get("regional_url", "")
        if (
            not isinstance(names, list)
            or not all(isinstance(n, str) for n in names)
            or not isinstance(when, str)
            or not isinstance(url, str)
        ):
            raise ValidationError("stored os-types is malformed", field="os_types")
        return cls(
            os_types=tuple(names),
            published_at=parse_ts(when, "published_at"),
            regional_url=url,
        )


def installable(plans: Mapping[str, Plan], artifacts_dir: Path | None) -> tuple[str, ...]:
    """The plans a regional can run now: those without an image, and those whose image is
    a file in ``artifacts_dir``; sorted."""
    names: list[str] = []
    for name, plan in plans.items():
        missing = artifacts_dir is None or not (artifacts_dir / plan.image).is_file()
        if plan.image and missing:
            continue
        names.append(name)
    return tuple(sorted(names))


def check_os_type(os_type: str, idc: str, published: OsTypes | None) -> None:
    """ValidationError(field="os_type") unless the IDC's regional offers ``os_type``."""
    if published is None:
        raise ValidationError(
            f"os_type {os_type!r}: the regional of IDC {idc} has not published the OS types "
            "it can install (is it running?)",
            field="os_type",
        )
    if os_type not in published.os_types:
        raise ValidationError(
            f"os_type {os_type!r} cannot be installed in IDC {idc}; choices: "
            + ", ".join(repr(o) for o in published.os_types),
            field="os_type",
        )
