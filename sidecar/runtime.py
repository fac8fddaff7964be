"""The runtime snapshot: settings, topology, router and compiler, as one immutable value.

A request captures ``state.runtime`` once when it starts and uses only that, so it never
sees settings from one configuration and nodes from another. A reload builds a new
snapshot and publishes it with a single assignment.
"""

from __future__ import annotations

from dataclasses import dataclass

from .coalesce import Coalescer
from .compiler import Compiler
from .router import Router
from .settings import LimitsSettings, Settings
from .topology import Topology


def compiler_for(limits: LimitsSettings) -> Compiler:
    return Compiler(
        max_where_depth=limits.max_where_depth,
        max_in_values=limits.max_in_values,
        max_result_rows=limits.max_result_rows,
        cache_bytes=limits.compile_cache_bytes,
    )


@dataclass(frozen=True, slots=True)
class Runtime:
    settings: Settings
    topology: Topology
    # One router for the process: its decision counters outlive reloads.
    router: Router
    compiler: Compiler
    # One for the process too: reads in flight across a reload still meet their group.
    coalescer: Coalescer

    @classmethod
    def first(cls, settings: Settings, topology: Topology) -> Runtime:
        return cls(settings, topology, Router(), compiler_for(settings.limits), Coalescer())

    def renewed(self, settings: Settings, topology: Topology) -> Runtime:
        """The snapshot after a reload; the compile cache stays unless the limits changed."""
        same = settings.limits == self.settings.limits
        compiler = self.compiler if same else compiler_for(settings.limits)
        return Runtime(settings, topology, self.router, compiler, self.coalescer)
