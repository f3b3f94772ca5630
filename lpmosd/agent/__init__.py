"""The agent that runs on the machine being installed (``lpmosd agent``).

It collects hardware facts (:mod:`~lpmosd.agent.facts`), registers with its IDC's regional
and talks to it over the agent API (:mod:`~lpmosd.agent.client`), runs the install plan's
steps (:mod:`~lpmosd.agent.runner`) and reports the outcome (:mod:`~lpmosd.agent.main`).
The command line is in :mod:`~lpmosd.agent.cli`.
"""

from __future__ import annotations

from lpmosd.agent.client import AgentAPIError, AgentClient, RegionalUnavailableError, RetryPolicy
from lpmosd.agent.facts import HardwareFacts, collect_facts
from lpmosd.agent.main import (
    EXIT_CANCELLED,
    EXIT_ERROR,
    EXIT_FAILED,
    EXIT_OK,
    AgentOptions,
    run_agent,
)
from lpmosd.agent.runner import StepResult, run_step

__all__ = [
    "EXIT_CANCELLED",
    "EXIT_ERROR",
    "EXIT_FAILED",
    "EXIT_OK",
    "AgentAPIError",
    "AgentClient",
    "AgentOptions",
    "HardwareFacts",
    "RegionalUnavailableError",
    "RetryPolicy",
    "StepResult",
    "collect_facts",
    "run_agent",
    "run_step",
]
