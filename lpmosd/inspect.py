"""``lpmosd inspect``: the guide's etcdctl troubleshooting, as readable commands.

- ``inspect servers --idc dc1``: the IDC's server directory, with each agent online/offline;
- ``inspect task dc1 sn-001``: the task rendered: status history, a progress bar per step,
  the last log lines (``--json``: the stored document);
- ``inspect lease dc1 sn-001``: lease id and remaining TTL, or "agent offline";
- ``inspect watch [--idc dc1]``: a live stream of changes (status changes, progress bars,
  new log lines, agents going on/offline); Ctrl-C stops it with exit status 0.

They only read. Exit status 1 with a one-line message when etcd does not answer or the key
asked for is absent ("agent offline" is such a case: it is what a script wants to test).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, Final

import trio

from lpmosd import schema, tasklogs
from lpmosd.documents import MachineMeta, ProgressStep, ServerEntry, Task
from lpmosd.errors import CompactedError, NotFoundError, ValidationError
from lpmosd.etcd import EtcdClient, EventType, KeyValue, WatchEvent, watch
from lpmosd.migrate import v2
from lpmosd.opsutil import (
    add_etcd_arguments,
    bar,
    etcd_config_from_args,
    idc_arg,
    open_etcd_client,
    run_trio,
    sn_arg,
)
from lpmosd.store import hardware_summary, parse_lease_value
from lpmosd.timestamps import format_ts

__all__ = [
    "register",
    "render_event",
    "render_lease",
    "render_servers",
    "render_task",
]

DEFAULT_LOG_LINES: Final = 10


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add ``inspect`` and its sub-commands to the main parser; returns its parser."""
    parser = subparsers.add_parser(
        "inspect",
        help="look at servers, tasks, agent leases and live changes in etcd",
        description="Read-only views of the v3 keyspace (the guide's troubleshooting).",
    )
    sub = parser.add_subparsers(dest="inspect_command", required=True, metavar="WHAT")

    p = sub.add_parser("servers", help="the server directory of one IDC")
    p.add_argument("--idc", required=True, type=idc_arg)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_etcd_arguments(p)
    p.set_defaults(handler=_cmd_servers)

    p = sub.add_parser("task", help="one server's task: history, progress, logs")
    p.add_argument("idc", type=idc_arg)
    p.add_argument("sn", type=sn_arg)
    p.add_argument("--json", action="store_true", help="print the stored task document")
    p.add_argument(
        "--logs",
        type=int,
        default=DEFAULT_LOG_LINES,
        metavar="N",
        help=f"show the last N log lines (default {DEFAULT_LOG_LINES}, 0: all)",
    )
    add_etcd_arguments(p)
    p.set_defaults(handler=_cmd_task)

    p = sub.add_parser("lease", help="the agent's lease: id and remaining TTL, or offline")
    p.add_argument("idc", type=idc_arg)
    p.add_argument("sn", type=sn_arg)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_etcd_arguments(p)
    p.set_defaults(handler=_cmd_lease)

    p = sub.add_parser("watch", help="stream changes live (Ctrl-C to stop)")
    p.add_argument("--idc", type=idc_arg, help="one IDC (default: every IDC)")
    p.add_argument("--no-logs", action="store_true", help="do not print new log lines")
    p.add_argument("--no-initial", action="store_true", help="do not print the current tasks first")
    add_etcd_arguments(p)
    p.set_defaults(handler=_cmd_watch)
    return parser


# ----------------------------------------------------------------------------- helpers


def _sn_of(kv: KeyValue) -> str:
    return kv.key.rsplit(b"/", 1)[-1].decode(errors="replace")


def _last_step(progress: Iterable[ProgressStep]) -> ProgressStep | None:
    best: ProgressStep | None = None
    for p in progress:
        if best is None or p.timestamp >= best.timestamp:
            best = p
    return best


def _step_line(p: ProgressStep, width: int = 18) -> str:
    msg = f"  {p.message}" if p.message else ""
    return f"{p.step:<{width}} {bar(p.percent)} {p.percent:3d}%{msg}"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


# ----------------------------------------------------------------------------- servers


async def _servers_data(client: EtcdClient, idc: str) -> dict[str, Any]:
    servers = await client.get_prefix(schema.servers_prefix(idc))
    machines = await client.range(schema.machines_prefix(idc), prefix=True, keys_only=True)
    online = set()
    for kv in machines.kvs:
        parsed = schema.parse_key(kv.key)
        if parsed is not None and parsed.kind == "lease":
            online.add(parsed.sn)
    v2_list = await client.get(v2.list_key(idc))
    rows = []
    for kv in servers.kvs:
        sn = _sn_of(kv)
        row: dict[str, Any] = {"sn": sn, "agent": "online" if sn in online else "offline"}
        try:
            entry = ServerEntry.from_json(kv.value)
        except ValidationError as exc:
            row |= {"status": "?", "error": f"unreadable server entry: {exc}"}
        else:
            row |= {
                "status": entry.status.value,
                "mac": entry.mac,
                "task_id": entry.task_id,
                "updated_at": format_ts(entry.updated_at),
            }
        rows.append(row)
    return {
        "idc": idc,
        "revision": servers.revision,
        "servers": rows,
        "v2_list_present": v2_list is not None,
    }


def render_servers(data: dict[str, Any]) -> list[str]:
    """The ``inspect servers`` text for :func:`_servers_data`'s result."""
    idc = data["idc"]
    rows = data["servers"]
    lines = []
    if rows:
        table = [["SN", "STATUS", "AGENT", "MAC", "TASK", "UPDATED"]]
        for r in rows:
            table.append(
                [
                    r["sn"],
                    r["status"],
                    r["agent"],
                    r.get("mac", ""),
                    r.get("task_id", ""),
                    r.get("updated_at", r.get("error", "")),
                ]
            )
        lines += _table(table)
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        by_status = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        online = sum(1 for r in rows if r["agent"] == "online")
        agents = f"{online} agent{'' if online == 1 else 's'} online"
        lines.append(
            f"{len(rows)} servers in {idc}: {by_status}; {agents} (revision {data['revision']})"
        )
    else:
        lines.append(f"no servers in {idc} (no keys under {schema.servers_prefix(idc)})")
    if data["v2_list_present"]:
        lines.append(
            f"note: v2 data present ({v2.list_key(idc)}); see `lpmosd migrate plan --idc {idc}`"
        )
    return lines


def _cmd_servers(args: argparse.Namespace) -> int:
    cfg = etcd_config_from_args(args)

    async def main() -> int:
        async with open_etcd_client(cfg, timeout=args.timeout) as client:
            data = await _servers_data(client, args.idc)
        if args.json:
            print(json.dumps(data, indent=2))
        else:
            print("\n".join(render_servers(data)))
        return 0

    return run_trio(main)


# -------------------------------------------------------------------------------- task


def render_task(
    task: Task, *, revision: int, agent: str, logs: int = DEFAULT_LOG_LINES
) -> list[str]:
    """The readable ``inspect task`` view of ``task``."""
    lines = [
        f"Task {task.task_id}  {task.idc or '?'}/{task.sn}  (mod_revision {revision})",
        f"  status      {task.status.value}   (updated {format_ts(task.updated_at)})",
        f"  agent       {agent}",
        f"  mac         {task.mac}",
        f"  os          {task.os_type} {task.os_version}".rstrip()
        + f"   disk: {task.disk_layout}   network: {task.network_config}",
        f"  created     {format_ts(task.created_at)}"
        + (f" by {task.created_by}" if task.created_by else ""),
    ]
    if task.approval is not None:
        a = task.approval
        verb = "approved" if a.approved else "rejected"
        notes = f' — "{a.notes}"' if a.notes else ""
        lines.append(
            f"  approval    {verb} by {a.approved_by} at {format_ts(a.approved_at)}{notes}"
        )
    if task.error:
        lines.append(f"  error       {task.error}")
    if task.resume_from:
        lines.append(f"  resume from {task.resume_from}")
    lines.append(f"  netboot     {'on' if task.netboot else 'off'}")
    lines.append("")
    lines.append("Status history:")
    for c in task.status_history:
        who = f"  by {c.actor}" if c.actor else ""
        why = f"  ({c.reason})" if c.reason else ""
        lines.append(f"  {format_ts(c.timestamp)}  {c.status.value:<10}{who}{why}")
    if not task.status_history:
        lines.append("  (none)")
    lines.append("")
    lines.append("Progress:")
    width = max([18, *(len(p.step) for p in task.progress)])
    lines += [f"  {_step_line(p, width)}" for p in task.progress] or ["  (no steps yet)"]
    lines.append("")
    total = len(task.logs) + task.logs_dropped
    shown = list(task.logs) if logs <= 0 else list(task.logs[-logs:])
    if len(shown) == total:
        lines.append(f"Logs ({total}):")
    else:
        dropped = f"; the {task.logs_dropped} oldest were dropped" if task.logs_dropped else ""
        lines.append(f"Logs (last {len(shown)} of {total}{dropped}):")
    lines += [f"  {line}" for line in shown] or ["  (none)"]
    return lines


async def _agent_state(client: EtcdClient, idc: str, sn: str) -> dict[str, Any]:
    """``online``, lease id and TTL of the agent of ``sn`` (from its lease key)."""
    key = schema.lease_key(idc, sn)
    kv = await client.get(key)
    out: dict[str, Any] = {"idc": idc, "sn": sn, "lease_key": key, "online": False}
    if kv is None:
        out["reason"] = "no lease key"
        return out
    out["value"] = kv.value.decode(errors="replace")
    named = parse_lease_value(kv.value)
    lease_id = kv.lease or named or 0
    out["lease_id"] = lease_id
    if named is not None and kv.lease and named != kv.lease:
        out["warning"] = f"value names lease {named} but the key is bound to lease {kv.lease}"
    if kv.lease == 0:
        out["reason"] = "the lease key is not bound to a lease (written by hand?)"
        return out
    info = await client.lease_time_to_live(kv.lease)
    if info is None:
        out["reason"] = "lease expired"
        return out
    out |= {"online": True, "ttl": info.ttl, "granted_ttl": info.granted_ttl}
    return out


def _agent_text(state: dict[str, Any]) -> str:
    if state["online"]:
        return (
            f"online (lease {state['lease_id']}, {state['ttl']}s of {state['granted_ttl']}s left)"
        )
    return f"offline ({state['reason']})"


async def _v2_hint(client: EtcdClient, idc: str, sn: str) -> str:
    kv = await client.get(v2.tasks_key(idc, sn))
    if kv is None:
        return ""
    return f"; v2 documents exist: run `lpmosd migrate plan --idc {idc}`"


def _cmd_task(args: argparse.Namespace) -> int:
    cfg = etcd_config_from_args(args)

    async def main() -> int:
        idc, sn = args.idc, args.sn
        async with open_etcd_client(cfg, timeout=args.timeout) as client:
            key = schema.task_key(idc, sn)
            # One Range of the machine's keys: the document and its log chunks agree.
            machine = (await client.get_prefix(schema.machine_prefix(idc, sn))).kvs
            kv = next((kv for kv in machine if kv.key == key.encode()), None)
            if kv is None:
                hint = await _v2_hint(client, idc, sn)
                server = await client.get(schema.server_key(idc, sn))
                if server is not None:
                    hint = f"; the server entry exists without its task{hint}"
                raise NotFoundError(f"no task for {idc}/{sn}: {key} is absent{hint}")
            agent = await _agent_state(client, idc, sn)
        if args.json:
            try:
                print(json.dumps(json.loads(kv.value), indent=2, ensure_ascii=False))
            except ValueError:
                sys.stdout.write(kv.value.decode(errors="replace") + "\n")
            return 0
        try:
            task = tasklogs.assemble(Task.from_json(kv.value), tasklogs.chunks_of(machine))
        except ValidationError as exc:
            raise ValidationError(
                f"{key} holds an invalid task ({exc}); see it raw with --json"
            ) from None
        lines = render_task(
            task, revision=kv.mod_revision, agent=_agent_text(agent), logs=args.logs
        )
        print("\n".join(lines))
        return 0

    return run_trio(main)


# ------------------------------------------------------------------------------- lease


def render_lease(state: dict[str, Any]) -> list[str]:
    """The ``inspect lease`` text for :func:`_agent_state`'s result."""
    where = f"{state['idc']}/{state['sn']}"
    if not state["online"]:
        lines = [f"{where}: agent offline ({state['reason']})"]
        if "value" in state:
            lines.append(f"  lease key   {state['lease_key']} = {state['value']}")
        else:
            lines.append(f"  lease key   {state['lease_key']} is absent")
        return lines
    lid = state["lease_id"]
    lines = [
        f"{where}: agent online",
        f"  lease key   {state['lease_key']} = {state['value']}",
        f"  lease id    {lid} (0x{lid:x})",
        f"  ttl         {state['ttl']}s remaining of {state['granted_ttl']}s",
    ]
    if "warning" in state:
        lines.append(f"  warning     {state['warning']}")
    return lines


def _cmd_lease(args: argparse.Namespace) -> int:
    cfg = etcd_config_from_args(args)

    async def main() -> int:
        async with open_etcd_client(cfg, timeout=args.timeout) as client:
            state = await _agent_state(client, args.idc, args.sn)
        if args.json:
            print(json.dumps(state, indent=2))
        else:
            print("\n".join(render_lease(state)))
        return 0 if state["online"] else 1

    return run_trio(main)


# ------------------------------------------------------------------------------- watch


def _clock() -> str:
    return datetime.now(UTC).strftime("%H:%M:%S")


def _parse_task(value: bytes | None) -> Task | None:
    if not value:
        return None
    try:
        return Task.from_json(value)
    except ValidationError:
        return None


def _task_lines(where: str, task: Task, prev: Task | None, logs: bool) -> list[str]:
    if prev is None or prev.task_id != task.task_id:
        out = [f"{where} task {task.task_id} created ({task.status.value})"]
        prev = None
    else:
        out = []
    if prev is not None and prev.status is not task.status:
        out.append(f"{where} status {prev.status.value} → {task.status.value}")
    before = {p.step: p for p in prev.progress} if prev is not None else {}
    for p in task.progress:
        old = before.get(p.step)
        if old is None or (old.percent, old.message) != (p.percent, p.message):
            out.append(f"{where} {_step_line(p)}")
    if logs:
        old_total = (len(prev.logs) + prev.logs_dropped) if prev is not None else 0
        new = len(task.logs) + task.logs_dropped - old_total
        if prev is None:
            new = min(new, 3)  # a new task: its creation line(s), not a whole backlog
        for line in task.logs[len(task.logs) - min(max(new, 0), len(task.logs)) :]:
            out.append(f"{where} log {line}")
    if task.error and (prev is None or prev.error != task.error):
        out.append(f"{where} error {task.error}")
    return out or [f"{where} task updated"]


def render_event(event: WatchEvent, *, logs: bool = True) -> list[str]:
    """Lines for one watch event (the watch asks for prev_kv, so changes can be diffed)."""
    ts = _clock()
    key = event.kv.key
    parsed = schema.parse_key(key)
    deleted = event.type is EventType.DELETE
    if parsed is None:
        text = key.decode(errors="replace")
        if text.startswith(schema.ROOT) and text.endswith("/servers"):
            return [f"{ts} v2 server list {text} {'deleted' if deleted else 'changed'}"]
        return [f"{ts} {'deleted' if deleted else 'put'} {text}"]
    where = f"{ts} {parsed.idc}/{parsed.sn}"
    prev_value = event.prev_kv.value if event.prev_kv is not None else None
    if parsed.kind == "task":
        if deleted:
            return [f"{where} task deleted"]
        task = _parse_task(event.kv.value)
        if task is None:
            return [f"{where} task written (not a valid task document)"]
        return _task_lines(where, task, _parse_task(prev_value), logs)
    if parsed.kind == "logs":
        # A chunk of new log lines (it comes just before the task document that lists it);
        # a deleted chunk is the cap dropping old lines: not news.
        if deleted or not logs:
            return []
        lines = tasklogs.chunk_lines(event.kv.value)
        if lines is None:
            return [f"{where} log chunk written (unreadable)"]
        return [f"{where} log {line}" for line in lines]
    if parsed.kind == "lease":
        if deleted:
            return [f"{where} agent OFFLINE (lease key gone: expired or revoked)"]
        if event.prev_kv is None:
            return [f"{where} agent online (lease {event.kv.lease})"]
        return []  # a rewrite of the same heartbeat key: nothing new to say
    if parsed.kind == "meta":
        if deleted:
            return [f"{where} hardware facts deleted"]
        try:
            meta = MachineMeta.from_json(event.kv.value)
        except ValidationError:
            return [f"{where} hardware facts written (unreadable)"]
        return [f"{where} hardware reported: {hardware_summary(meta)}"]
    if parsed.kind in ("enrolment", "agent_token", "first_boot"):
        # Agent credentials (hashed; see lpmosd.credentials): say only that they changed.
        what = {"enrolment": "enrolment secret", "agent_token": "agent token"}.get(
            parsed.kind, "first-boot credential"
        )
        return [f"{where} {what} {'removed' if deleted else 'issued'}"]
    # server entry: it mirrors the task, so only additions and removals are news
    if deleted:
        return [f"{where} server removed"]
    if event.prev_kv is None:
        return [f"{where} server added"]
    return []


async def _initial(client: EtcdClient, prefix: str) -> int:
    result = await client.get_prefix(prefix)
    for kv in result.kvs:
        parsed = schema.parse_key(kv.key)
        if parsed is None or parsed.kind != "task":
            continue
        task = _parse_task(kv.value)
        if task is None:
            continue
        step = _last_step(task.progress)
        tail = f"  {_step_line(step)}" if step is not None else ""
        print(f"now      {parsed.idc}/{parsed.sn} {task.status.value}{tail}", flush=True)
    return result.revision


async def _watch_loop(client: EtcdClient, prefix: str, *, initial: bool, logs: bool) -> None:
    rev = await _initial(client, prefix) if initial else 0
    while True:
        print(f"watching {prefix} (Ctrl-C to stop)", file=sys.stderr, flush=True)
        try:
            async with watch(
                client, prefix, start_revision=rev + 1 if rev else 0, prev_kv=True
            ) as s:
                async for batch in s:
                    rev = batch.revision
                    for event in batch.events:
                        for line in render_event(event, logs=logs):
                            print(line, flush=True)
        except CompactedError:
            # History we needed is gone: start again from now (the view may skip changes).
            print("history compacted: resynchronising", file=sys.stderr, flush=True)
            rev = await _initial(client, prefix)


def _cmd_watch(args: argparse.Namespace) -> int:
    cfg = etcd_config_from_args(args)
    prefix = schema.idc_prefix(args.idc) if args.idc else schema.ROOT

    async def main() -> int:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with (
                open_etcd_client(cfg, timeout=args.timeout) as client,
                trio.open_nursery() as nursery,
            ):

                async def stop() -> None:
                    async for _ in signals:
                        nursery.cancel_scope.cancel()
                        return

                async def stream() -> None:
                    await _watch_loop(
                        client, prefix, initial=not args.no_initial, logs=not args.no_logs
                    )

                nursery.start_soon(stop)
                nursery.start_soon(stream)
        print("stopped", file=sys.stderr, flush=True)
        return 0

    return run_trio(main)
