"""Optional: py-spy profiles of the sidecar and the client during one workload.

``py-spy record --format raw`` writes collapsed stacks ("frame;frame;frame count"); the
summary here ranks frames by samples on top of the stack (self) and anywhere in it
(inclusive). py-spy is not a dependency: without it on PATH the profile is skipped.
"""

from __future__ import annotations

import asyncio
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from .variants import Variant
from .workloads import Workload, measure

# Frames that wrap everything (the entry point and the event loop's run call).
_ROOT_FILES = ("<frozen runpy>", "sidecar/cli.py", "asyncio/runners.py")


def _parse(text: str) -> tuple[str, str]:
    """'Connection.fetch (asyncpg/connection.py:717)' -> (short frame, package)."""
    name, _, where = text.partition(" (")
    where = where.rstrip(")")
    path = where.rsplit(":", 1)[0]
    if path.startswith("asyncio/runners.py"):
        # Time on top of Runner.run is spent in the event loop itself (uvloop, native code).
        return "event loop (uvloop, native)", "event loop"
    package = path.split("/", 1)[0] if "/" in path else "other"
    return f"{name} ({Path(path).name}:{where.rsplit(':', 1)[-1]})", package


def summarise(collapsed: str, top: int = 25) -> dict[str, Any]:
    own: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        raw = stack.split(";")
        frames = [_parse(f) for f in raw]
        if frames:
            own[frames[-1][0]] += count
            packages[frames[-1][1]] += count
        names = {
            f
            for (f, _), r in zip(frames, raw, strict=True)
            if not any(f"({p}" in r for p in _ROOT_FILES)
        }
        for frame in names:
            inclusive[frame] += count

    def ranked(counter: Counter[str], n: int = top) -> list[dict[str, Any]]:
        return [
            {"frame": f, "samples": c, "share": c / total if total else 0.0}
            for f, c in counter.most_common(n)
        ]

    # Frames under (nearly) every sample are entry points, not findings.
    for frame in [f for f, c in inclusive.items() if total and c / total >= 0.95]:
        del inclusive[frame]

    return {
        "samples": total,
        "self_by_package": ranked(packages, 50),
        "self": ranked(own),
        "inclusive": ranked(inclusive),
    }


async def profile(
    pids: dict[str, int], variant: Variant, workload: Workload, seconds: float, out: Path
) -> dict[str, Any]:
    """Record each process (name -> pid) while ``workload`` runs on ``variant``."""
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        return {"status": "py-spy not installed (pip install py-spy)"}
    paths = {name: out.with_name(f"{out.name}-{name}.txt") for name in pids}
    procs: dict[str, asyncio.subprocess.Process] = {}
    outputs: dict[str, bytes] = {}
    await variant.open()
    try:
        await measure(workload, variant, 0.3, seed=7)  # warm-up
        for name, pid in pids.items():
            argv = [py_spy, "record", "--pid", str(pid), "--duration", str(round(seconds))]
            argv += ["--rate", "100", "--format", "raw", "--output", str(paths[name])]
            procs[name] = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
            )
        try:
            sample = await measure(workload, variant, round(seconds) + 0.5, seed=8)
            for name, proc in procs.items():
                outputs[name], _ = await asyncio.wait_for(proc.communicate(), 30)
        finally:
            for proc in procs.values():
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
    finally:
        await variant.close()
    result: dict[str, Any] = {
        "status": "ok",
        "workload": workload.key,
        "variant": variant.name,
        "ops_per_s": sample.ops_per_s,
        "processes": {},
    }
    for name, proc in procs.items():
        if proc.returncode != 0 or not paths[name].exists():
            text = outputs.get(name, b"").decode(errors="replace")[-500:]
            result["processes"][name] = {"status": f"py-spy failed ({proc.returncode}): {text}"}
            continue
        summary = summarise(paths[name].read_text())
        summary.update(status="ok", collapsed_stacks=str(paths[name]))
        result["processes"][name] = summary
    return result


def render(profile: dict[str, Any], top: int = 12) -> str:
    if profile.get("status") != "ok":
        return f"profile: {profile.get('status')}"
    lines = []
    for name, p in profile["processes"].items():
        if p.get("status") != "ok":
            lines.append(f"{name} profile: {p.get('status')}")
            continue
        lines += [
            f"{name} profile ({profile['variant']} {profile['workload']}, {p['samples']} "
            f"samples, {profile['ops_per_s']:,.0f} ops/s while profiled)",
            "  self time by package: "
            + ", ".join(f"{e['frame']} {e['share']:.0%}" for e in p["self_by_package"]),
            "  top frames by self time:",
        ]
        lines += [f"    {e['share']:6.1%}  {e['frame']}" for e in p["self"][:top]]
        lines.append("  top frames by inclusive time:")
        lines += [f"    {e['share']:6.1%}  {e['frame']}" for e in p["inclusive"][:top]]
    return "\n".join(lines)
