"""One exception tree for lpmosd; errors are mapped to it at every boundary.

::

    LpmosdError
    ├── ConfigError              bad config file or flag; carries the key path
    ├── InputError               bad client input (HTTP 4xx); carries the field
    │   ├── ValidationError      malformed or out-of-range value (400/422)
    │   ├── NotFoundError        no such server/task (404)
    │   ├── ConflictError        illegal state transition or already exists (409)
    │   ├── PayloadTooLargeError body over the limit (413)
    │   ├── GoneError            a continue token's revision was compacted: restart (410)
    │   ├── AuthenticationError  no or bad credentials (401)
    │   └── PermissionDeniedError  credentials lack the role (403)
    ├── UnavailableError         the role is restarting its session; retry (503)
    └── EtcdError                anything from the etcd client
        ├── EtcdUnavailableError no endpoint answered (retryable)
        ├── EtcdAuthError        etcd refused our credentials or permissions
        ├── EtcdRequestError     etcd rejected the request (too many ops, too large, ...)
        │   ├── LeaseNotFoundError  the lease does not exist (expired or revoked)
        │   ├── FutureRevisionError a read asked for a revision etcd has not reached
        │   └── EtcdNoSpaceError    etcd's NOSPACE alarm: writes refused until an operator acts
        ├── CompactedError       the requested revision was compacted: relist
        ├── ContentionError      atomic_update gave up after its retry bound
        ├── LeaseLost            a lease we held expired, was revoked, or lost keepalive
        └── NotLeaderError       a fenced write refused: we do not hold the leadership

gRPC status codes are mapped to EtcdError subclasses in ``lpmosd.etcd._bridge``; callers
never see grpclib types, asyncio.CancelledError or ExceptionGroups from our internals.
"""

from __future__ import annotations


class LpmosdError(Exception):
    """Base of every error lpmosd raises on purpose."""


class ConfigError(LpmosdError):
    """A configuration value is missing or invalid; ``path`` is the dotted key path."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.message = message


class InputError(LpmosdError):
    """Bad input from a client; ``field`` names the offending field when known."""

    status = 400

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class ValidationError(InputError):
    """A value is malformed, of the wrong type, or out of range."""

    status = 400


class NotFoundError(InputError):
    """The named server, task or resource does not exist."""

    status = 404


class ConflictError(InputError):
    """The request conflicts with current state (illegal transition, already exists)."""

    status = 409


class PayloadTooLargeError(InputError):
    """The request body exceeds the configured limit."""

    status = 413


class GoneError(InputError):
    """What the request refers to is no longer kept (a list's compacted revision)."""

    status = 410


class AuthenticationError(InputError):
    """No credentials, or credentials that are wrong, expired or revoked."""

    status = 401


class PermissionDeniedError(InputError):
    """Valid credentials whose role does not allow the request."""

    status = 403


class UnavailableError(LpmosdError):
    """The role cannot serve right now (e.g. restarting after losing its lease): 503."""


class EtcdError(LpmosdError):
    """Base of errors from the etcd client."""


class EtcdUnavailableError(EtcdError):
    """No etcd endpoint could be reached, or the request timed out; safe to retry reads."""


class EtcdAuthError(EtcdError):
    """etcd refused our credentials or the operation is not permitted for our user."""


class EtcdRequestError(EtcdError):
    """etcd rejected the request itself (invalid argument, too many ops, too large)."""


class LeaseNotFoundError(EtcdRequestError):
    """The lease does not exist (any more): it expired or was revoked."""


class FutureRevisionError(EtcdRequestError):
    """A read asked for a revision etcd has not reached yet (a forged or foreign one)."""


#: What an operator must do about a NOSPACE alarm (error messages, readyz, README).
NOSPACE_HELP = (
    "etcd is out of space (NOSPACE alarm) and refuses writes: compact its history, "
    "defragment every member (lpmosd etcd defrag), then disarm the alarm "
    "(etcdctl alarm disarm); lpmosd resumes by itself"
)


class EtcdNoSpaceError(EtcdRequestError):
    """etcd's database reached its quota (NOSPACE alarm): every write is refused until an
    operator compacts, defragments and disarms. Not retryable by the caller."""

    def __init__(self, detail: str = "") -> None:
        super().__init__(f"{NOSPACE_HELP} ({detail})" if detail else NOSPACE_HELP)


class CompactedError(EtcdError):
    """The requested revision has been compacted; the caller must relist.

    ``compact_revision`` is the oldest revision still available.
    """

    def __init__(self, message: str, compact_revision: int) -> None:
        super().__init__(message)
        self.compact_revision = compact_revision


class ContentionError(EtcdError):
    """atomic_update could not commit within its retry bound."""

    def __init__(self, key: str, attempts: int) -> None:
        super().__init__(f"{key}: gave up after {attempts} conflicting attempts")
        self.key = key
        self.attempts = attempts


class LeaseLost(EtcdError):
    """A lease we held is gone: expired, revoked, or keepalives failed past its deadline."""

    def __init__(self, lease_id: int, reason: str, *, unreachable: bool = False) -> None:
        super().__init__(f"lease {lease_id:x} lost: {reason}")
        self.lease_id = lease_id
        self.reason = reason
        #: True when etcd did not answer (keepalives failed); False when it answered that
        #: the lease is gone, or when nothing says (we were paused past the deadline).
        self.unreachable = unreachable


class NotLeaderError(EtcdError):
    """A fenced write was refused: this process does not hold the leadership it depends on.

    Either it never won the election (a standby) or it lost it (its election key is gone,
    e.g. it was paused past its session TTL); etcd wrote nothing.
    """
