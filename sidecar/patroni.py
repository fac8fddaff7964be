"""What a Patroni cluster's keys say about its members.

Patroni (with its ``etcd3`` DCS) keeps, under ``<namespace>/<scope>/``: ``leader`` (the
leader's member name, held under a lease of ``ttl`` seconds) and ``members/<name>`` (a
JSON document per running Patroni: ``conn_url``, ``role``, ``state``, ``xlog_location``,
...). The leader key names the primary; every other member is a replica. This is where a
node is and what Patroni believes; the sidecar's own probes still decide what a node
does (``pg_is_in_recovery()``, fencing), and they measure lag themselves from WAL
positions every ``health.position_interval``, fresher than a member's ``xlog_location``,
which Patroni writes once per ``loop_wait``.
"""

from __future__ import annotations

import json
import logging
from urllib.parse import urlsplit

from .topology import CatalogNode

log = logging.getLogger("dbsidecar.registry")


def members(prefix: bytes, keys: dict[bytes, bytes]) -> list[CatalogNode]:
    """The members under ``prefix``, the leader tagged ``primary``, sorted by name."""
    leader = keys.get(prefix + b"leader", b"").decode(errors="replace")
    found = []
    member_prefix = prefix + b"members/"
    for key, value in keys.items():
        if not key.startswith(member_prefix):
            continue
        name = key[len(member_prefix) :].decode(errors="replace")
        try:
            url = urlsplit(json.loads(value)["conn_url"])
            host, port = url.hostname, url.port or 5432
        except (ValueError, KeyError, TypeError):
            # The value is Patroni's, not a secret; still only the key is named.
            log.warning("ignoring Patroni member %s: no usable conn_url", key.decode())
            continue
        if host is None:
            continue
        role = "primary" if name == leader else "replica"
        found.append(CatalogNode(id=name, address=host, port=port, tags=(role,)))
    return sorted(found, key=lambda node: node.id)
