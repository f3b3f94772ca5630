"""``lpmosd migrate export | import | plan | apply | verify | purge-records``.

Exit codes: 0 done and clean; 1 something needs the operator (a server skipped or in
conflict, verify mismatch, import conflict) or etcd failed; 2 bad config or arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lpmosd import hooks, schema
from lpmosd.errors import ValidationError
from lpmosd.etcd import EtcdClient
from lpmosd.migrate import v2
from lpmosd.migrate.apply import (
    DEFAULT_CONCURRENCY,
    ApplyReport,
    Outcome,
    ServerResult,
    apply,
)
from lpmosd.migrate.export import (
    discover_idcs,
    export_v2,
    import_v2,
    read_export,
    write_export,
)
from lpmosd.migrate.plan import Action, Plan, make_plan, read_snapshot
from lpmosd.migrate.record import records_prefix
from lpmosd.migrate.verify import VerifyReport, verify
from lpmosd.opsutil import (
    Progress,
    add_etcd_arguments,
    etcd_config_from_args,
    open_etcd_client,
    run_trio,
)

__all__ = ["register"]


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if not 1 <= n <= 256:
        raise argparse.ArgumentTypeError("must be 1..256")
    return n


def _add_idcs(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument(
        "--idc",
        action="append",
        metavar="IDC",
        help="the IDC (repeat, or comma-separate, for several)",
    )
    g.add_argument(
        "--all", action="store_true", help="every IDC that has v2 keys or migration records"
    )


def _idcs(args: argparse.Namespace) -> list[str]:
    out: list[str] = []
    for raw in args.idc or ():
        for part in str(raw).split(","):
            if not part.strip():
                continue
            try:
                idc = schema.validate_idc(part.strip())
            except ValidationError as exc:
                raise ValidationError(f"--idc: {exc.message}") from None
            if idc not in out:
                out.append(idc)
    return out


async def _resolve_idcs(client: EtcdClient, args: argparse.Namespace) -> list[str]:
    if args.all:
        found = await discover_idcs(client)
        if not found:
            print("no IDC has v2 keys or migration records", file=sys.stderr)
        return found
    return _idcs(args)


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add ``migrate`` and its sub-commands to the main parser; returns its parser."""
    parser = subparsers.add_parser(
        "migrate",
        help="migrate LPMOS v2.x data to the v3 schema (export, plan, apply, verify)",
        description=(
            "Move LPMOS v2.x keys (/os/{idc}/servers list, machines/{sn}/tasks + state) to "
            "the v3 schema. Recommended order: export, plan, apply, verify. Every command is "
            "safe to repeat; apply can be killed and re-run at any point."
        ),
    )
    sub = parser.add_subparsers(dest="migrate_command", required=True, metavar="STEP")

    p = sub.add_parser("export", help="write a re-importable JSON snapshot of the v2 keys")
    _add_idcs(p)
    p.add_argument("-o", "--output", required=True, help="file to write ('-': stdout)")
    add_etcd_arguments(p)
    p.set_defaults(handler=_cmd_export)

    p = sub.add_parser("import", help="restore v2 keys from an export (never overwrites)")
    p.add_argument("file", help="an export file ('-': stdin)")
    _add_idcs(p, required=False)
    p.add_argument("--dry-run", action="store_true", help="show what would be restored")
    add_etcd_arguments(p)
    p.set_defaults(handler=_cmd_import)

    p = sub.add_parser("plan", help="dry run: what apply would write, delete and skip")
    _add_idcs(p)
    p.add_argument("--json", action="store_true", help="machine-readable plan")
    p.add_argument("-v", "--verbose", action="store_true", help="list every server")
    add_etcd_arguments(p)
    p.set_defaults(handler=_cmd_plan)

    p = sub.add_parser("apply", help="migrate: one guarded Txn per server, then the list")
    _add_idcs(p)
    p.add_argument(
        "--concurrency",
        type=_positive_int,
        default=DEFAULT_CONCURRENCY,
        help=f"Txns in flight at once (default {DEFAULT_CONCURRENCY})",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="print only problems and totals")
    add_etcd_arguments(p)
    p.set_defaults(handler=_cmd_apply)

    p = sub.add_parser("verify", help="check every v2 server is in v3 with equal content")
    _add_idcs(p)
    p.add_argument(
        "--against", type=Path, metavar="EXPORT", help="also check every server of this export"
    )
    p.add_argument("--json", action="store_true", help="machine-readable report")
    add_etcd_arguments(p)
    p.set_defaults(handler=_cmd_verify)

    p = sub.add_parser(
        "purge-records",
        help="delete the migration records (/os/_migrate-v2/{idc}/) after a passing verify",
    )
    _add_idcs(p)
    p.add_argument("--force", action="store_true", help="purge even if verify fails")
    add_etcd_arguments(p)
    p.set_defaults(handler=_cmd_purge)
    return parser


# ------------------------------------------------------------------------------ export


def _cmd_export(args: argparse.Namespace) -> int:
    cfg = etcd_config_from_args(args)

    async def main() -> int:
        async with open_etcd_client(cfg, timeout=args.timeout) as client:
            idcs = await _resolve_idcs(client, args)
            export = await export_v2(client, idcs)
        write_export(export, args.output)
        out = sys.stderr if args.output == "-" else sys.stdout
        for idc, rev in sorted(export.idcs.items()):
            servers = export.servers(idc)
            print(
                f"{idc}: exported {len(export.keys_of(idc))} v2 keys ({len(servers)} machines, "
                f"{len(export.listed(idc))} listed) at revision {rev}",
                file=out,
            )
        if args.output != "-":
            print(f"wrote {args.output}", file=out)
        return 0

    return run_trio(main)


def _cmd_import(args: argparse.Namespace) -> int:
    cfg = etcd_config_from_args(args)
    export = read_export(args.file)
    idcs = _idcs(args) if args.idc else None

    async def main() -> int:
        async with open_etcd_client(cfg, timeout=args.timeout) as client:
            report = await import_v2(
                client,
                export,
                idcs=idcs,
                dry_run=args.dry_run,
                on_key=lambda key, status: (
                    print(f"{status:14} {key}") if status != "restored" else None
                ),
            )
        verb = "would restore" if args.dry_run else "restored"
        print(
            f"{verb} {len(report.restored)} keys, {len(report.unchanged)} already present, "
            f"{len(report.conflicts)} present with other content (not overwritten)"
        )
        return 0 if report.ok else 1

    return run_trio(main)


# -------------------------------------------------------------------------------- plan


def _plan_text(plan: Plan, verbose: bool) -> list[str]:
    idc = plan.idc
    lines = []
    if plan.list_kv is None:
        head = f"no v2 list key {v2.list_key(idc)}"
    else:
        head = (
            f"v2 list {v2.list_key(idc)}: {len(plan.listed)} servers "
            f"(mod_revision {plan.list_kv.mod_revision})"
        )
    lines.append(f"{idc}: read at revision {plan.revision}; {head}")
    if not plan.items and plan.list_kv is None:
        lines.append(f"  nothing to migrate: no v2 documents or migration records in {idc}")
    unlisted = sum(1 for i in plan.with_action(Action.MIGRATE) if not i.listed)
    for action in Action:
        extra = f"  ({unlisted} not in the list)" if action is Action.MIGRATE and unlisted else ""
        lines.append(f"  {action.value:9} {plan.count(action):6}{extra}")
    if plan.list_problem:
        lines.append(f"  list key: {plan.list_problem}; it will be kept")
    elif plan.list_kv is not None:
        if plan.list_deletable:
            lines.append("  the list key will be deleted after the last server")
        else:
            lines.append(
                f"  the list key will be kept: {len(plan.blocking)} listed servers cannot be "
                "migrated"
            )
    for note in plan.list_notes:
        lines.append(f"  note      list: {note}")
    for item in plan.items:
        if item.action in (Action.SKIP, Action.CONFLICT):
            lines.append(f"  {item.action.value:9} {item.sn}: {item.reason}")
        elif verbose:
            what = f": {item.reason}" if item.reason else ""
            if item.merged is not None:
                t = item.merged.task
                what = (
                    f" → {t.status.value}, {len(t.progress)} steps, {len(t.logs)} log lines, "
                    f"{len(t.status_history)} history entries"
                )
            lines.append(f"  {item.action.value:9} {item.sn}{what}")
        elif item.action is Action.MIGRATE and not item.listed and plan.list_kv is not None:
            lines.append(f"  unlisted  {item.sn}: has documents but is not in the list; migrated")
        if verbose:
            lines += [f"            note: {note}" for note in item.notes]
    if plan.count(Action.MIGRATE):
        lines.append(
            f"  per server, one Txn: put {schema.servers_prefix(idc)}{{sn}}, "
            f"{schema.machines_prefix(idc)}{{sn}}/task, {records_prefix(idc)}{{sn}}; "
            f"delete {schema.machines_prefix(idc)}{{sn}}/tasks and /state"
        )
    return lines


def _cmd_plan(args: argparse.Namespace) -> int:
    cfg = etcd_config_from_args(args)

    async def main() -> int:
        async with open_etcd_client(cfg, timeout=args.timeout) as client:
            idcs = await _resolve_idcs(client, args)
            plans = [make_plan(await read_snapshot(client, idc)) for idc in idcs]
        if args.json:
            json.dump([p.to_dict() for p in plans], sys.stdout, indent=1)
            print()
        else:
            for plan in plans:
                print("\n".join(_plan_text(plan, args.verbose)))
        return 0 if all(p.clean for p in plans) else 1

    return run_trio(main)


# ------------------------------------------------------------------------------- apply


def _result_line(res: ServerResult) -> str:
    where = f"{res.idc}/{res.sn}"
    if res.outcome is Outcome.MIGRATED:
        return f"migrated  {where}"
    if res.outcome is Outcome.ALREADY:
        return f"already   {where}: {res.reason}"
    return f"{res.outcome.value:9} {where}: {res.reason}"


def _summary(report: ApplyReport) -> str:
    parts = [
        f"{report.count(Outcome.MIGRATED)} migrated",
        f"{report.count(Outcome.ALREADY)} already done",
        f"{report.count(Outcome.SKIPPED)} skipped",
        f"{report.count(Outcome.CONFLICT)} in conflict",
    ]
    other = report.count(Outcome.CHANGED) + report.count(Outcome.ERROR)
    if other:
        parts.append(f"{other} failed (re-run apply)")
    key = v2.list_key(report.idc)
    if report.list_deleted:
        tail = f"{key} deleted"
    elif report.list_present:
        tail = f"{key} kept"
    else:
        tail = "no v2 list key"
    return f"{report.idc}: {', '.join(parts)} in {report.elapsed:.2f}s; {tail}"


async def _fault_points(point: str) -> None:
    # apply's hook points ("after-txn:sn-001") as named fault points (lpmosd.hooks):
    # "migrate.after-txn", so a test can stop or kill this process at the n-th one.
    if point.startswith(("before-txn:", "after-txn:")):
        sys.stdout.flush()  # what the run reported so far reaches the test
    await hooks.reach("migrate." + point.partition(":")[0])


def _cmd_apply(args: argparse.Namespace) -> int:
    cfg = etcd_config_from_args(args)

    async def main() -> int:
        ok = True
        async with open_etcd_client(cfg, timeout=args.timeout) as client:
            for idc in await _resolve_idcs(client, args):
                progress = Progress(0, f"{idc}:")

                def on_plan(plan: Plan, progress: Progress = progress) -> None:
                    progress.total += plan.count(Action.MIGRATE)

                def on_result(res: ServerResult, progress: Progress = progress) -> None:
                    problem = res.outcome not in (Outcome.MIGRATED, Outcome.ALREADY)
                    # "already" is counted in the summary: a re-run must not print 500 lines.
                    chatty = res.outcome is Outcome.MIGRATED and not args.quiet
                    if problem or (chatty and not progress.enabled):
                        progress.line(_result_line(res))
                    if res.outcome in (Outcome.MIGRATED, Outcome.CHANGED, Outcome.ERROR):
                        progress.advance()

                try:
                    report = await apply(
                        client,
                        idc,
                        concurrency=args.concurrency,
                        hook=_fault_points,
                        on_plan=on_plan,
                        on_result=on_result,
                    )
                finally:
                    progress.close()
                for event in report.events:
                    print(f"note      {event}")
                print(_summary(report))
                ok = ok and report.ok
        return 0 if ok else 1

    return run_trio(main)


# ------------------------------------------------------------------------------ verify


def _verify_text(report: VerifyReport) -> list[str]:
    verdict = "PASSED" if report.passed else f"FAILED ({len(report.problems)} problems)"
    extra = []
    if report.updated_since:
        extra.append(f"{report.updated_since} updated by the daemon since (identity checked)")
    if report.unrecorded:
        extra.append(f"{report.unrecorded} in v3 without a migration record")
    detail = f" ({'; '.join(extra)})" if extra else ""
    lines = [
        f"{report.idc}: {report.checked} servers checked at revision {report.revision}, "
        f"{report.equal} match v2{detail}: {verdict}"
    ]
    lines += [f"  problem   {sn}: {p}" for sn, p in report.problems]
    lines += [f"  note      {sn}: {n}" for sn, n in report.notes]
    return lines


def _cmd_verify(args: argparse.Namespace) -> int:
    cfg = etcd_config_from_args(args)
    against = read_export(args.against) if args.against else None

    async def main() -> int:
        async with open_etcd_client(cfg, timeout=args.timeout) as client:
            idcs = await _resolve_idcs(client, args)
            reports = [await verify(client, idc, against=against) for idc in idcs]
        if args.json:
            json.dump([r.to_dict() for r in reports], sys.stdout, indent=1)
            print()
        else:
            for r in reports:
                print("\n".join(_verify_text(r)))
        return 0 if reports and all(r.passed for r in reports) else 1

    return run_trio(main)


# ------------------------------------------------------------------------------- purge


def _cmd_purge(args: argparse.Namespace) -> int:
    cfg = etcd_config_from_args(args)

    async def main() -> int:
        code = 0
        async with open_etcd_client(cfg, timeout=args.timeout) as client:
            for idc in await _resolve_idcs(client, args):
                report = await verify(client, idc)
                if not report.passed and not args.force:
                    print("\n".join(_verify_text(report)))
                    print(f"{idc}: verify failed; records kept (use --force to purge anyway)")
                    code = 1
                    continue
                r = await client.delete(records_prefix(idc), prefix=True)
                print(f"{idc}: deleted {r.deleted} migration records")
        return code

    return run_trio(main)
