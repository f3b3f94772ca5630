"""LPMOS v2.x → v3 migration: ``lpmosd migrate export | import | plan | apply | verify``.

- :mod:`~lpmosd.migrate.v2`: the v2 format (documented there) and a v2 writer;
- :mod:`~lpmosd.migrate.merge`: mergeTaskAndState, v2 documents → one v3 task;
- :mod:`~lpmosd.migrate.record`: per-server migration records kept in etcd;
- :mod:`~lpmosd.migrate.plan`: one consistent scan, a per-server decision;
- :mod:`~lpmosd.migrate.apply`: one guarded Txn per server, the v2 list last;
- :mod:`~lpmosd.migrate.verify`: every v2 server in v3 with equal content;
- :mod:`~lpmosd.migrate.export`: JSON snapshot of the v2 keys, and its import;
- :mod:`~lpmosd.migrate.cli`: the sub-commands (:func:`register`).
"""

from lpmosd.migrate.cli import register

__all__ = ["register"]
