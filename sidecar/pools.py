"""One asyncpg pool per node, and the per-connection setup every pool shares."""

from __future__ import annotations

import logging
from typing import Any

import asyncpg
import msgspec

from .settings import NodeSettings, PoolSettings

log = logging.getLogger("dbsidecar.pools")


def _json_encode(value: Any) -> str:
    return msgspec.json.encode(value).decode()


class SidecarConnection(asyncpg.Connection):
    """A connection that remembers whether it ran anything that can leave session
    state behind (raw SQL, an interactive transaction)."""

    __slots__ = ("_dirty",)

    def mark_dirty(self) -> None:
        self._dirty = True

    async def discard_session(self) -> None:
        """Back to a new session's state: DISCARD ALL (settings, temporary tables, prepared
        statements, cursors, listens, advisory locks)."""
        # The pool has rolled back an open transaction before calling this.
        self._dirty = False
        await self.execute("DISCARD ALL")
        # DISCARD ALL deallocated asyncpg's prepared statements on the server too: forget
        # them here, or the next plan on this connection names a statement that is gone.
        self._drop_local_statement_cache()


async def _reset(conn: SidecarConnection) -> None:
    # Compiled plans leave no session state, so releasing after one costs no round
    # trip; a connection that ran raw SQL or a transaction starts a clean session.
    if getattr(conn, "_dirty", False):
        await conn.discard_session()


async def _setup_connection(conn: asyncpg.Connection) -> None:
    # JSON columns travel as documents ({"$json": ...}), not as their text.
    for typ in ("json", "jsonb"):
        await conn.set_type_codec(
            typ, encoder=_json_encode, decoder=msgspec.json.decode, schema="pg_catalog"
        )


def connect_kwargs(node: NodeSettings, database: str, where: str) -> dict[str, Any]:
    """asyncpg connection arguments; the password is resolved here, never logged."""
    kwargs: dict[str, Any] = {"password": node.resolved_password(where)}
    if node.dsn:
        kwargs["dsn"] = node.dsn
    else:
        kwargs.update(host=node.host, port=node.port, database=node.database or database)
    if node.user:
        kwargs["user"] = node.user
    return kwargs


async def create_pool(
    node: NodeSettings, database: str, settings: PoolSettings, where: str
) -> asyncpg.Pool:
    kwargs = connect_kwargs(node, database, where)
    common: dict[str, Any] = dict(
        max_size=settings.max_size,
        max_inactive_connection_lifetime=settings.max_inactive_connection_lifetime,
        init=_setup_connection,
        reset=_reset,
        connection_class=SidecarConnection,
        timeout=settings.connect_timeout,
        server_settings={
            "application_name": "dbsidecar",
            "statement_timeout": str(int(settings.statement_timeout * 1000)),
        },
        **kwargs,
    )
    try:
        return await asyncpg.create_pool(min_size=settings.min_size, **common)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        # A node that is down at start must not stop the sidecar: its pool
        # connects on demand and the health probe decides when it serves.
        log.warning("node %s unreachable at start (%s); connecting on demand", where, exc)
        return await asyncpg.create_pool(min_size=0, **common)
