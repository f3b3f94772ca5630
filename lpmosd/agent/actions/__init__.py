"""Built-in plan steps the agent carries out itself (the ``debian-12`` plan).

A step with ``action`` set (instead of a command) names one of :data:`ACTIONS`; the agent
runs it in Python, reporting real percentages and each tool's output as log lines:

- ``partitioning``: the target disk (``disk_layout: auto``: the first non-removable disk
  large enough), signatures wiped, GPT with a 1 MiB BIOS-boot partition, a 512 MiB ESP and
  an ext4 root;
- ``base_system``: the plan's OS image streamed from the regional, its sha256 checked while
  streaming, resumed with a Range request after a network error, extracted onto the root;
- ``bootloader``: fstab, then GRUB for BIOS and UEFI (also at the removable-media path) in a
  chroot with /dev, /proc and /sys bound;
- ``network``: the task's ``network_config`` (``dhcp`` or a static spec) bound to its MAC,
  hostname = sn;
- ``post_install``: root's authorized_keys, the first-boot credential; the disk is unmounted.

Every step can run again on its own (a retry resumes at the failed step, in a fresh
installer): each finds the disk again by the same rule and mounts what it needs.
"""

from lpmosd.agent.actions.context import ActionContext, ActionError, run_action

__all__ = ["ACTION_NAMES", "ActionContext", "ActionError", "run_action"]

ACTION_NAMES = ("partitioning", "base_system", "bootloader", "network", "post_install")
