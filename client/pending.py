"""A record write that has not started yet, so it can still be pointed elsewhere.

``await user.save()`` writes where the record lives; ``await user.save().using(shard)``
(the design's sharding form) writes through ``shard`` instead. ``save()`` therefore
returns this object, not a coroutine: nothing is sent until it is awaited. It is a
``Coroutine`` (it starts on first ``send``), so ``asyncio.create_task(user.save())``
and ``asyncio.gather`` keep working, and one that is never awaited warns as a forgotten
coroutine would.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Coroutine, Generator
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from .connection import Handle

T = TypeVar("T")


class PendingWrite(Coroutine[Any, Any, T]):
    __slots__ = ("_closed", "_coro", "_run", "_target", "_what")

    def __init__(
        self,
        run: Callable[[str | Handle | None], Coroutine[Any, Any, T]],
        target: str | Handle | None,
        what: str,
    ) -> None:
        self._run = run
        self._target = target
        self._what = what
        self._coro: Coroutine[Any, Any, T] | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"<PendingWrite {self._what}>"

    def using(self, target: str | Handle) -> PendingWrite[T]:
        """Write through ``target``: a handle, a transaction, a handle's name, a logical
        database or a shard name (``'user_shard_2'``)."""
        if self._coro is not None:
            raise RuntimeError(f"{self._what} has started; using() comes before await")
        self._target = target
        return self

    def _started(self) -> Coroutine[Any, Any, T]:
        if self._coro is None:
            self._coro = self._run(self._target)
        return self._coro

    def __await__(self) -> Generator[Any, None, T]:
        return self._started().__await__()

    def send(self, value: Any) -> Any:
        return self._started().send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        return self._started().throw(typ, val, tb)

    def close(self) -> None:
        self._closed = True  # closed before it started: nothing ran, nothing to warn about
        if self._coro is not None:
            self._coro.close()

    def __del__(self) -> None:
        if getattr(self, "_coro", True) is None and not self._closed:
            warnings.warn(
                f"{self._what} was never awaited, so nothing was written",
                RuntimeWarning,
                stacklevel=2,
            )
