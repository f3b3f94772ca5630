"""Install plans: the steps an agent runs for one ``os_type``, and how their commands are filled.

A plan comes from the regional's configuration (``[regional.plans."<os_type>"]``, parsed by
:mod:`lpmosd.config`), is served to the agent with its task, and runs there
(:mod:`lpmosd.agent.runner`). Plain data and pure functions only: the agent imports this.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

__all__ = [
    "DEFAULT_STEP_TIMEOUT",
    "DEMO_PLAN",
    "PLAN_PLACEHOLDERS",
    "PlaceholderError",
    "Plan",
    "PlanStep",
    "render_command",
]

PLAN_PLACEHOLDERS: Final = frozenset(
    {"task_id", "idc", "sn", "mac", "os_type", "os_version", "disk_layout", "network_config"}
)
"""Task fields a plan step's command may reference as ``{name}`` (``{{``/``}}`` for braces)."""

DEFAULT_STEP_TIMEOUT: Final = 3600.0
_FORMATTER: Final = string.Formatter()


@dataclass(frozen=True, kw_only=True, slots=True)
class PlanStep:
    """One step of an install plan.

    ``command`` is an argv (never a shell string); its arguments may contain
    :data:`PLAN_PLACEHOLDERS` as ``{name}``, filled in by :func:`render_command`. A step with
    ``simulate`` set has no command: the agent sleeps that many seconds instead (demo plan).
    """

    name: str
    command: tuple[str, ...] = ()
    timeout: float = DEFAULT_STEP_TIMEOUT
    simulate: float | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class Plan:
    """The ordered steps an agent runs to install one ``os_type``."""

    os_type: str
    steps: tuple[PlanStep, ...]

    @property
    def step_names(self) -> tuple[str, ...]:
        """Step names in order."""
        return tuple(step.name for step in self.steps)


DEMO_PLAN: Final = Plan(
    os_type="demo",
    steps=tuple(
        PlanStep(name=name, timeout=60.0, simulate=1.0)
        for name in (
            "partitioning",
            "base_system",
            "packages",
            "bootloader",
            "network",
            "post_install",
        )
    ),
)
"""The built-in plan for os_type ``"demo"``: every step is simulated; a config may override it."""


class PlaceholderError(ValueError):
    """A command argument uses a placeholder we cannot fill, or has unbalanced braces."""


def render_command(command: Sequence[str], values: Mapping[str, str]) -> tuple[str, ...]:
    """Fill ``{name}`` placeholders in each argument from ``values`` (``{{``/``}}`` escape).

    Only bare names are allowed: no ``{x.attr}``, ``{x[0]}``, ``{x!r}`` or ``{x:>8}``, because
    the plan arrives over the network and ``str.format`` would otherwise evaluate attribute
    lookups on our values. Anything else raises :class:`PlaceholderError`.
    """
    out: list[str] = []
    for i, arg in enumerate(command):
        parts: list[str] = []
        try:
            parsed = list(_FORMATTER.parse(arg))
        except ValueError as exc:
            raise PlaceholderError(f"command[{i}]: {exc}") from None
        for literal, name, spec, conversion in parsed:
            parts.append(literal)
            if name is None:
                continue
            if name not in values or spec or conversion:
                known = ", ".join("{" + k + "}" for k in sorted(values))
                raise PlaceholderError(
                    f"command[{i}]: unknown placeholder {{{name}}} (known: {known})"
                )
            parts.append(values[name])
        out.append("".join(parts))
    return tuple(out)
