"""A Trio-native etcd v3 client speaking gRPC through grpclib and betterproto2 stubs.

Only :mod:`lpmosd.etcd._bridge` knows that asyncio and gRPC exist.
"""

from lpmosd.etcd._bridge import TLSFiles, ensure_loop
from lpmosd.etcd.client import Auth, EtcdClient, Write, open_client
from lpmosd.etcd.election import candidate_key, leader_of, nominate, wait_for_leadership
from lpmosd.etcd.fence import Fence
from lpmosd.etcd.lease import HeldLease, open_lease
from lpmosd.etcd.txn import Compare, Delete, Get, Op, Put, delete, get, prefix_end, put
from lpmosd.etcd.types import (
    DeleteResult,
    EventType,
    KeyValue,
    LeaseInfo,
    MemberStatus,
    PutResult,
    RangeResult,
    TxnResult,
    UpdateResult,
    WatchBatch,
    WatchEvent,
)
from lpmosd.etcd.watch import WatchStream, watch

__all__ = [
    "Auth",
    "Compare",
    "Delete",
    "DeleteResult",
    "EtcdClient",
    "EventType",
    "Fence",
    "Get",
    "HeldLease",
    "KeyValue",
    "LeaseInfo",
    "MemberStatus",
    "Op",
    "Put",
    "PutResult",
    "RangeResult",
    "TLSFiles",
    "TxnResult",
    "UpdateResult",
    "WatchBatch",
    "WatchEvent",
    "WatchStream",
    "Write",
    "candidate_key",
    "delete",
    "ensure_loop",
    "get",
    "leader_of",
    "nominate",
    "open_client",
    "open_lease",
    "prefix_end",
    "put",
    "wait_for_leadership",
    "watch",
]
