"""How many simulation actors fit in the memory this machine (or its container) has free."""

from __future__ import annotations

import os
from pathlib import Path

# What a simulation actor holds of its own beyond what this process holds once it has built the
# experiment (torch's and Flower's state, the data, the model): Ray's worker, the client's own
# partition and training state. Measured on Fashion-MNIST, 3 clients, memory not shared with
# other processes (libraries' pages are): 680 MB an actor, 472 MB this process when it decides.
_ACTOR_EXTRA_BYTES = 256 * 2**20


_MEMORY_FOR_ACTORS = 0.8  # of the memory available when the simulation starts


def clients_at_once_in_memory(wanted: int) -> tuple[int, str]:
    """How many of ``wanted`` concurrent clients' simulation actors fit in the memory available
    now, each estimated as this process's own memory (once it has built the experiment) plus
    Ray's worker and a client's own share; and, where fewer fit, why."""
    available, own = _available_memory_bytes(), _private_bytes()
    if wanted <= 1 or available is None or own is None:
        return wanted, ""
    per_actor = own + _ACTOR_EXTRA_BYTES
    fit = max(1, int(_MEMORY_FOR_ACTORS * available // per_actor))
    if fit >= wanted:
        return wanted, ""
    return fit, (
        f"{wanted} clients train at once under this strategy, but the memory available "
        f"({available / 2**30:.1f} GiB) fits about {fit} simulation actors of {per_actor / 2**20:.0f} MB: "
        f"clients train {fit} at a time, and a strategy that gathers requests (batched, or in the clients' "
        "order) gathers those of the clients training, after one flush timeout as each new client starts, "
        "so such a run no longer repeats bit for bit"
    )


_MEMINFO = "/proc/meminfo"


def _available_memory_bytes() -> int | None:
    """The machine's available memory, or a container's room under its cgroup limit if less
    (None where neither can be read: not Linux, so no estimate and no cap)."""
    machine = None
    try:
        for line in Path(_MEMINFO).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                machine = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    room = _cgroup_room_bytes()
    return machine if room is None else room if machine is None else min(machine, room)


_CGROUP_LIMITS = (  # (limit, usage, stat file, its reclaimable page cache) of cgroup v2, then v1
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory.stat", "inactive_file"),
    (
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
        "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        "/sys/fs/cgroup/memory/memory.stat",
        "total_inactive_file",
    ),
)


def _cgroup_room_bytes() -> int | None:
    for limit_file, usage_file, stat_file, inactive_key in _CGROUP_LIMITS:
        try:
            limit, usage = Path(limit_file).read_text().strip(), Path(usage_file).read_text().strip()
        except OSError:
            continue
        if limit.isdigit() and usage.isdigit() and int(limit) < 2**60:  # "max", or v1's huge "no limit"
            # Usage counts the page cache of files read (a dataset), which the kernel gives back
            # under pressure: the inactive part is room, as MemAvailable and the kubelet count it.
            return max(int(limit) - int(usage) + _cgroup_stat(stat_file, inactive_key), 0)
    return None


def _cgroup_stat(stat_file: str, key: str) -> int:
    """One figure of a cgroup's memory.stat (0 where it cannot be read)."""
    try:
        for line in Path(stat_file).read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


def _private_bytes() -> int | None:
    """This process's resident memory that is not shared files' pages (libraries)."""
    try:
        _, resident, shared = (int(field) for field in Path("/proc/self/statm").read_text().split()[:3])
    except (OSError, ValueError):
        return None
    return (resident - shared) * os.sysconf("SC_PAGE_SIZE")
