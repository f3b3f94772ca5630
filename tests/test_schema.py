"""Tests for lpmosd.schema: name and MAC validation, key builders and parse_key."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lpmosd import schema
from lpmosd.errors import ValidationError
from lpmosd.schema import (
    NAME_RE,
    ParsedKey,
    agent_token_key,
    enrolment_key,
    idc_prefix,
    lease_key,
    log_chunk_key,
    machine_prefix,
    machines_prefix,
    meta_key,
    normalize_mac,
    parse_key,
    server_key,
    servers_prefix,
    task_key,
    validate_idc,
    validate_sn,
)

names = st.from_regex(NAME_RE, fullmatch=True)

GOOD_NAMES = ["dc1", "sn-001", "A", "0", "a.b_c-d", "x" * 64, "SN.2024_07"]
BAD_NAMES: list[object] = [
    None,
    1,
    b"dc1",
    ["dc1"],
    "",
    ".",
    "..",
    "...",
    ".hidden",
    "-dash",
    "_under",
    "a/b",
    "/",
    "a\x00b",
    "dc1\n",
    " dc1",
    "dc 1",
    "dc1\t",
    "x" * 65,
    "ｄｃ1",  # fullwidth letters
    "dс1",  # Cyrillic es
    "dc١",  # Arabic-Indic digit one
    "dc1:2",
    "dc*",
]


@pytest.mark.parametrize("value", GOOD_NAMES)
@pytest.mark.parametrize(("fn", "field"), [(validate_idc, "idc"), (validate_sn, "sn")])
def test_valid_names(fn: Callable[[object], str], field: str, value: str) -> None:
    assert fn(value) == value


@pytest.mark.parametrize("value", BAD_NAMES)
@pytest.mark.parametrize(("fn", "field"), [(validate_idc, "idc"), (validate_sn, "sn")])
def test_invalid_names(fn: Callable[[object], str], field: str, value: object) -> None:
    with pytest.raises(ValidationError) as exc:
        fn(value)
    assert exc.value.field == field


def test_dot_names_refused_even_though_charset_allows_dots() -> None:
    # "." is in the charset, so only the alnum-first rule keeps "." and ".." out of keys.
    for value in (".", "..", "..."):
        assert NAME_RE.fullmatch(value) is None
        with pytest.raises(ValidationError):
            server_key("dc1", value)
        with pytest.raises(ValidationError):
            idc_prefix(value)


@pytest.mark.parametrize(
    "value",
    ["00:1A:2b:3c:4d:5e", "00-1a-2b-3c-4d-5e", "001a2b3c4d5e", "001a.2b3c.4d5e", "001A2B3C4D5E"],
)
def test_normalize_mac_accepts_forms(value: str) -> None:
    assert normalize_mac(value) == "00:1a:2b:3c:4d:5e"


@pytest.mark.parametrize(
    "value",
    [
        None,
        0x001A2B3C4D5E,
        b"001a2b3c4d5e",
        "",
        "00:1a:2b:3c:4d",
        "00:1a:2b:3c:4d:5e:6f",
        "00:1a-2b:3c:4d:5e",  # mixed separators
        "00:1a:2b:3c:4d:5g",
        "0:1a:2b:3c:4d:5e",
        "001a2b3c4d5",
        "001a.2b3c.4d5e.",
        "00.1a.2b.3c.4d.5e",
        " 00:1a:2b:3c:4d:5e",
        "00:1a:2b:3c:4d:5e\n",
        "００:1a:2b:3c:4d:5e",  # fullwidth digits
        "٠٠1a2b3c4d5e",  # Arabic-Indic digits
    ],
)
def test_normalize_mac_rejects(value: object) -> None:
    with pytest.raises(ValidationError) as exc:
        normalize_mac(value)
    assert exc.value.field == "mac"


def test_key_builders() -> None:
    assert schema.ROOT == "/os/"
    assert idc_prefix("dc1") == "/os/dc1/"
    assert servers_prefix("dc1") == "/os/dc1/servers/"
    assert server_key("dc1", "sn-001") == "/os/dc1/servers/sn-001"
    assert machines_prefix("dc1") == "/os/dc1/machines/"
    assert machine_prefix("dc1", "sn-001") == "/os/dc1/machines/sn-001/"
    assert task_key("dc1", "sn-001") == "/os/dc1/machines/sn-001/task"
    assert meta_key("dc1", "sn-001") == "/os/dc1/machines/sn-001/meta"
    assert lease_key("dc1", "sn-001") == "/os/dc1/machines/sn-001/lease"


@pytest.mark.parametrize("builder", [server_key, machine_prefix, task_key, meta_key, lease_key])
def test_builders_validate_every_part(builder: Callable[[str, str], str]) -> None:
    with pytest.raises(ValidationError) as exc:
        builder("../x", "sn-001")
    assert exc.value.field == "idc"
    with pytest.raises(ValidationError) as exc:
        builder("dc1", "sn/../../x")
    assert exc.value.field == "sn"


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("/os/dc1/servers/sn-001", ParsedKey("dc1", "server", "sn-001")),
        ("/os/dc1/machines/sn-001/task", ParsedKey("dc1", "task", "sn-001")),
        ("/os/dc1/machines/sn-001/meta", ParsedKey("dc1", "meta", "sn-001")),
        ("/os/dc1/machines/sn-001/lease", ParsedKey("dc1", "lease", "sn-001")),
        (b"/os/dc1/machines/sn-001/lease", ParsedKey("dc1", "lease", "sn-001")),
    ],
)
def test_parse_key(key: str | bytes, expected: ParsedKey) -> None:
    assert parse_key(key) == expected


@pytest.mark.parametrize(
    "key",
    [
        "",
        "/os/",
        "/os/dc1",
        "/os/dc1/",
        "/os/dc1/servers",
        "/os/dc1/servers/",
        "/os/dc1/servers/sn-001/",
        "/os/dc1/servers/sn-001/task",
        "/os/dc1/machines/sn-001",
        "/os/dc1/machines/sn-001/",
        "/os/dc1/machines/sn-001/tasks",
        "/os/dc1/machines/sn-001/state",
        "/os/dc1/machines/sn-001/task/",
        "/os/dc1/machines/sn-001/task/x",
        "/os//servers/sn-001",
        "/os/../servers/sn-001",
        "/os/dc1/servers/..",
        "/os/dc1/machines/./task",
        "os/dc1/servers/sn-001",
        "//os/dc1/servers/sn-001",
        "/OS/dc1/servers/sn-001",
        "/os/dc1/Servers/sn-001",
        "/os/dc1/servers/sn\x00",
        "/os/dc1/servers/sn-001\n",
        "/os/dc1/servers",  # the v2 list key
        b"/os/dc1/servers/\xff",
    ],
)
def test_parse_key_rejects_outside_layout(key: str | bytes) -> None:
    assert parse_key(key) is None


BUILDERS: list[tuple[Callable[[str, str], str], str]] = [
    (server_key, "server"),
    (task_key, "task"),
    (meta_key, "meta"),
    (lease_key, "lease"),
    (enrolment_key, "enrolment"),
    (agent_token_key, "agent_token"),
]


@given(idc=names, sn=names)
def test_parse_key_round_trips(idc: str, sn: str) -> None:
    for builder, kind in BUILDERS:
        assert parse_key(builder(idc, sn)) == ParsedKey(idc, kind, sn)  # type: ignore[arg-type]
        assert parse_key(builder(idc, sn).encode()) == ParsedKey(idc, kind, sn)  # type: ignore[arg-type]
    # Prefixes are directories, never keys.
    assert parse_key(machine_prefix(idc, sn)) is None
    assert parse_key(servers_prefix(idc)) is None


@given(
    idc=st.one_of(names, st.text(max_size=70)),
    sn=st.one_of(names, st.text(max_size=70)),
)
def test_built_keys_never_escape_their_prefix(idc: str, sn: str) -> None:
    for builder, kind in BUILDERS:
        try:
            key = builder(idc, sn)
        except ValidationError as exc:
            assert exc.field in ("idc", "sn")
            continue
        assert key.startswith(f"/os/{idc}/")
        assert parse_key(key) == ParsedKey(idc, kind, sn)  # type: ignore[arg-type]


SEGMENTS = [
    "os",
    "OS",
    "dc1",
    "servers",
    "machines",
    "sn-1",
    "task",
    "meta",
    "lease",
    "..",
    "",
    "logs",
    "000001",
    "000000",
    "0000001",
    "999999",
    "1000000",
    "+00001",
    " 00001",
    "00001",
]


@given(
    segments=st.lists(st.one_of(st.sampled_from(SEGMENTS), st.text(max_size=4)), max_size=6),
    lead=st.sampled_from(["/", "", "//"]),
)
def test_parse_key_result_rebuilds_same_key(segments: list[str], lead: str) -> None:
    key = lead + "/".join(segments)
    parsed = parse_key(key)
    if parsed is None:
        return
    if parsed.kind == "logs":
        assert log_chunk_key(parsed.idc, parsed.sn, parsed.seq) == key
        return
    builder = dict((kind, b) for b, kind in BUILDERS)[parsed.kind]
    assert builder(parsed.idc, parsed.sn) == key


@pytest.mark.parametrize(
    ("key", "seq"),
    [
        ("/os/dc1/machines/sn-001/logs/000001", 1),
        ("/os/dc1/machines/sn-001/logs/999999", 999_999),
        ("/os/dc1/machines/sn-001/logs/1000000", 1_000_000),
        (b"/os/dc1/machines/sn-001/logs/000042", 42),
    ],
)
def test_parse_key_log_chunks(key: str | bytes, seq: int) -> None:
    assert parse_key(key) == ParsedKey("dc1", "logs", "sn-001", seq)


@pytest.mark.parametrize(
    "key",
    [
        "/os/dc1/machines/sn-001/logs",
        "/os/dc1/machines/sn-001/logs/",
        "/os/dc1/machines/sn-001/logs/000000",  # seq starts at 1
        "/os/dc1/machines/sn-001/logs/00001",  # fewer than 6 digits
        "/os/dc1/machines/sn-001/logs/0000001",  # padded beyond 6: not a key we make
        "/os/dc1/machines/sn-001/logs/+00001",
        "/os/dc1/machines/sn-001/logs/ 00001",
        "/os/dc1/machines/sn-001/logs/00000１",  # a full-width digit
        "/os/dc1/machines/sn-001/logs/000001/x",
        "/os/dc1/machines/sn-001/logs/000001\n",
        "/os/dc1/machines/sn-001/logs/../task",
        "/os/dc1/machines/../logs/000001",
        "/os/dc1/machines/sn-001/log/000001",
        "/os/dc1/servers/sn-001/logs/000001",
        "/os/dc1/machines/sn-001/logs/99999999999999999999",  # beyond 2**63
    ],
)
def test_parse_key_rejects_log_chunk_escapes(key: str) -> None:
    assert parse_key(key) is None


@pytest.mark.parametrize("seq", [0, -1, 2**63, True, 1.0, "1"])
def test_log_chunk_key_refuses_bad_seq(seq: object) -> None:
    with pytest.raises(ValidationError) as exc:
        log_chunk_key("dc1", "sn-001", seq)  # type: ignore[arg-type]
    assert exc.value.field == "seq"


@given(idc=names, sn=names, seq=st.integers(1, 2**63 - 1))
def test_log_chunk_keys_stay_under_their_machine(idc: str, sn: str, seq: int) -> None:
    key = log_chunk_key(idc, sn, seq)
    assert key.startswith(schema.logs_prefix(idc, sn))
    assert key.startswith(machine_prefix(idc, sn))
    assert parse_key(key) == ParsedKey(idc, "logs", sn, seq)


@given(value=st.text(max_size=20))
def test_normalize_mac_is_idempotent_or_refuses(value: str) -> None:
    try:
        mac = normalize_mac(value)
    except ValidationError:
        return
    assert normalize_mac(mac) == mac
    assert len(mac) == 17
