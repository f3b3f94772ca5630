"""Fencing: a compare on the writer's election key, added to every Txn it sends.

A leader holds its election key (bound to its session lease) at a known create revision.
Each of its writes carries ``create_revision(key) == revision``: once the key is gone (the
lease expired while the process was paused, partitioned or slow) etcd refuses the write,
whatever the process still believes. A fence that holds no term refuses locally.
"""

from __future__ import annotations

from dataclasses import dataclass

from lpmosd.errors import NotLeaderError
from lpmosd.etcd.txn import Compare
from lpmosd.etcd.types import RangeResult


@dataclass(eq=False)
class Fence:
    """The leadership term a writer's transactions are guarded on (mutable: one per role)."""

    #: What the leadership is of, for error messages ("regional dc1", "control-plane").
    name: str
    key: bytes | None = None
    revision: int = 0

    @property
    def held(self) -> bool:
        """Whether this process believes it leads (etcd has the last word)."""
        return self.key is not None

    def hold(self, key: bytes, revision: int) -> None:
        """Start a term: the election key and its create revision."""
        self.key, self.revision = key, revision

    def release(self) -> None:
        """End the term: every later fenced write is refused locally."""
        self.key, self.revision = None, 0

    def compare(self) -> Compare:
        """The Txn compare of the current term; NotLeaderError when there is none."""
        if self.key is None:
            raise NotLeaderError(f"not the {self.name} leader (standby); nothing written")
        return Compare.create_revision(self.key, "==", self.revision)

    @staticmethod
    def check(term: Compare, seen: RangeResult) -> None:
        """After a failed Txn guarded by ``term``: NotLeaderError when that term has ended
        (``seen``: the election key as the Txn's failure branch read it)."""
        kv = seen.kvs[0] if seen.kvs else None
        if kv is None or kv.create_revision != term.value:
            raise NotLeaderError(
                f"lost the leadership of election key {term.key.decode(errors='replace')} "
                "(it is gone); nothing written"
            )
