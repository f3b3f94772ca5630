"""Install plans: the steps an agent runs for one ``os_type``, and how their commands are filled.

A plan comes from the regional's configuration (``[regional.plans."<os_type>"]``, parsed by
:mod:`lpmosd.config`), is served to the agent with its task, and runs there
(:mod:`lpmosd.agent.runner`). Plain data and pure functions only: the agent imports this.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from lpmosd.errors import ConfigError
from lpmosd.fields import bounded_number
from lpmosd.schema import STEP_RE

__all__ = [
    "DEBIAN_12_PLAN",
    "DEFAULT_STEP_TIMEOUT",
    "DEMO_PLAN",
    "MAX_PLAN_STEPS",
    "PLAN_PLACEHOLDERS",
    "STEP_KEYS",
    "PlaceholderError",
    "Plan",
    "PlanError",
    "PlanStep",
    "check_os_type",
    "parse_steps",
    "plan_from_wire",
    "plan_to_wire",
    "render_command",
]

PLAN_PLACEHOLDERS: Final = frozenset(
    {"task_id", "idc", "sn", "mac", "os_type", "os_version", "disk_layout", "network_config"}
)
"""Task fields a plan step's command may reference as ``{name}`` (``{{``/``}}`` for braces)."""

DEFAULT_STEP_TIMEOUT: Final = 3600.0
MAX_STEP_TIMEOUT: Final = 86400.0
MAX_PLAN_STEPS: Final = 64
#: The keys of one step in the config file (on the wire also ``action``, of built-in plans).
STEP_KEYS: Final = ("name", "command", "timeout", "simulate")
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
    #: A step the agent carries out itself in Python (the built-in ``debian-12`` plan; see
    #: :mod:`lpmosd.agent.actions`) instead of a command.
    action: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class Plan:
    """The ordered steps an agent runs to install one ``os_type``."""

    os_type: str
    steps: tuple[PlanStep, ...]
    #: The OS image the plan installs, relative to ``[regional.boot] artifacts_dir``: the
    #: regional offers the plan only while that file exists ("" = needs no image).
    image: str = ""

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

DEBIAN_12_PLAN: Final = Plan(
    os_type="debian-12",
    image="images/debian-12.tar.zst",
    steps=tuple(
        PlanStep(name=name, action=name, timeout=timeout)
        for name, timeout in (
            ("partitioning", 300.0),
            ("base_system", 1800.0),
            ("bootloader", 900.0),
            ("network", 120.0),
            ("post_install", 300.0),
        )
    ),
)
"""The built-in plan for os_type ``"debian-12"``: the agent installs the ``debian-12`` image
itself (``lpmosd image build debian-12``); a config may override it."""


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


# --------------------------------------------------------------------------- validation


class PlanError(ConfigError):
    """A plan breaks a rule; ``path`` says where, relative to the plan (``steps[0].name``)."""


def check_os_type(os_type: str) -> str:
    """The name of a plan (the ``os_type`` it installs): 1-128 printable characters."""
    if not (0 < len(os_type) <= 128 and os_type.isprintable() and os_type.strip() == os_type):
        raise PlanError("", "os_type must be 1..128 printable characters, no surrounding spaces")
    return os_type


def parse_steps(raw_steps: Sequence[Mapping[str, Any]]) -> tuple[PlanStep, ...]:
    """Steps from their config-file or wire form (mappings of :data:`STEP_KEYS`).

    The one definition of a valid plan: the regional checks its configuration with it, and
    the agent checks what the regional served. Raises :class:`PlanError`.
    """
    if not 1 <= len(raw_steps) <= MAX_PLAN_STEPS:
        raise PlanError("steps", f"must have 1..{MAX_PLAN_STEPS} steps")
    steps: list[PlanStep] = []
    for i, raw in enumerate(raw_steps):
        step = _parse_step(raw, f"steps[{i}]")
        if any(s.name == step.name for s in steps):
            raise PlanError(f"steps[{i}].name", f"duplicate step name {step.name!r}")
        steps.append(step)
    return tuple(steps)


def _parse_step(raw: Mapping[str, Any], path: str) -> PlanStep:
    if "name" not in raw:
        raise PlanError(f"{path}.name", "is required")
    name = raw["name"]
    if not isinstance(name, str):
        raise PlanError(f"{path}.name", "must be a string")
    if not STEP_RE.fullmatch(name):
        # Progress reports name the step; the regional refuses other names.
        raise PlanError(f"{path}.name", f"must match {STEP_RE.pattern}")
    timeout = _number(
        raw.get("timeout", DEFAULT_STEP_TIMEOUT), f"{path}.timeout", 1, MAX_STEP_TIMEOUT
    )
    simulate = raw.get("simulate")
    if simulate is not None:
        simulate = _number(simulate, f"{path}.simulate", 0, timeout, lo_open=True)
    action = raw.get("action")
    if action is not None and not isinstance(action, str):
        raise PlanError(f"{path}.action", "must be a string")
    command: tuple[str, ...] = ()
    raw_command = raw.get("command")
    # On the wire a simulated or built-in step carries an empty command list.
    quiet = simulate is not None or action is not None
    if raw_command is not None and (not quiet or raw_command != []):
        if quiet:
            other = "simulate" if simulate is not None else "action"
            raise PlanError(path, f"set either command or {other}, not both")
        command = _command(raw_command, f"{path}.command")
    elif not quiet:
        raise PlanError(f"{path}.command", "is required (an argv list) unless simulate is set")
    return PlanStep(name=name, command=command, timeout=timeout, simulate=simulate, action=action)


def _number(value: object, path: str, lo: float, hi: float, *, lo_open: bool = False) -> float:
    try:
        return bounded_number(value, lo, hi, lo_open=lo_open)
    except ValueError as exc:
        raise PlanError(path, str(exc)) from None


def _command(value: object, path: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PlanError(path, "must be a list of strings")
    if not value:
        raise PlanError(path, "must not be empty")
    # An absolute program path: no PATH lookup on the machine being installed, no shell.
    if not value[0].startswith("/") or "{" in value[0]:
        raise PlanError(f"{path}[0]", "must be an absolute program path without placeholders")
    for i, arg in enumerate(value):
        try:
            fields = list(_FORMATTER.parse(arg))
        except ValueError as exc:
            raise PlanError(f"{path}[{i}]", f"bad placeholder syntax: {exc}") from exc
        for _, name, spec, conversion in fields:
            if name is None:
                continue
            if name not in PLAN_PLACEHOLDERS:
                known = ", ".join("{" + p + "}" for p in sorted(PLAN_PLACEHOLDERS))
                raise PlanError(
                    f"{path}[{i}]",
                    f"unknown placeholder {{{name}}} (known: {known}; write {{{{ }}}} for braces)",
                )
            if spec or conversion:
                raise PlanError(
                    f"{path}[{i}]", f"placeholder {{{name}}} takes no conversion or format spec"
                )
    return tuple(value)


# ---------------------------------------------------------------------------- the wire


def plan_to_wire(plan: Plan | None) -> dict[str, Any] | None:
    """The ``plan`` object of the agent API (``lpmosd/web/openapi/agent.yaml``)."""
    if plan is None:
        return None
    return {
        "name": plan.os_type,
        "image": plan.image,
        "steps": [
            {
                "name": s.name,
                "command": list(s.command),
                # Whole seconds as integers, as before fractional timeouts were kept.
                "timeout": int(s.timeout) if float(s.timeout).is_integer() else s.timeout,
                "simulate": s.simulate,
                **({"action": s.action} if s.action is not None else {}),
            }
            for s in plan.steps
        ],
    }


def plan_from_wire(obj: object) -> Plan | None:
    """Parse the ``plan`` of a task reply (``None`` stays ``None``); unknown keys are
    ignored. Raises :class:`PlanError` with paths under ``plan``."""
    if obj is None:
        return None
    try:
        if not isinstance(obj, dict):
            raise PlanError("", "must be an object")
        name = obj.get("name")
        if not isinstance(name, str):
            raise PlanError("name", "must be a string")
        check_os_type(name)
        raw_steps = obj.get("steps")
        if not isinstance(raw_steps, list) or not all(isinstance(s, dict) for s in raw_steps):
            raise PlanError("steps", "must be a list of objects")
        image = obj.get("image", "")
        if not isinstance(image, str):
            raise PlanError("image", "must be a string")
        return Plan(os_type=name, steps=parse_steps(raw_steps), image=image)
    except PlanError as exc:
        raise PlanError(f"plan.{exc.path}" if exc.path else "plan", exc.message) from None
