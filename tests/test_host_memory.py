"""How many simulation actors fit: the memory available, a container's cgroup limit included."""

from __future__ import annotations

from pathlib import Path

import pytest

from splitflower import _host_memory


def test_clients_at_once_are_as_many_as_the_memory_available_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    gib = 2**30
    monkeypatch.setattr(_host_memory, "_private_bytes", lambda: int(0.75 * gib))  # + 0.25 GiB per actor
    monkeypatch.setattr(_host_memory, "_available_memory_bytes", lambda: 10 * gib)
    assert _host_memory.clients_at_once_in_memory(5) == (5, "")
    fit, why = _host_memory.clients_at_once_in_memory(30)  # 0.8 * 10 GiB / 1 GiB
    assert fit == 8
    assert "30 clients train at once" in why and "fits about 8 simulation actors of 1024 MB" in why
    monkeypatch.setattr(_host_memory, "_available_memory_bytes", lambda: None)  # not Linux: no estimate
    assert _host_memory.clients_at_once_in_memory(30) == (30, "")


def test_the_memory_available_is_a_container_s_room_under_its_cgroup_limit_where_that_is_less(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.undo()  # the suite's fixture hides the memory available; this test reads it
    assert (_host_memory._available_memory_bytes() or 0) > 0, "this machine's own (Linux, as CI's)"
    meminfo = tmp_path / "meminfo"  # the machine's MemAvailable moves as other processes run: fix it
    meminfo.write_text(f"MemTotal:       99999999 kB\nMemAvailable:   {2**21} kB\nCached: 5 kB\n")
    limit, usage, stat = tmp_path / "memory.max", tmp_path / "memory.current", tmp_path / "memory.stat"
    monkeypatch.setattr(_host_memory, "_MEMINFO", str(meminfo))
    monkeypatch.setattr(_host_memory, "_CGROUP_LIMITS", ((str(limit), str(usage), str(stat), "inactive_file"),))
    assert _host_memory._available_memory_bytes() == 2**31, "no cgroup files: the machine's MemAvailable"
    limit.write_text("max\n")
    usage.write_text("1000\n")
    assert _host_memory._available_memory_bytes() == 2**31, "no limit"
    limit.write_text(f"{2**20 + 1000}\n")
    assert _host_memory._available_memory_bytes() == 2**20, "1 MiB of room under the limit"
    usage.write_text(f"{2**21}\n")
    assert _host_memory._available_memory_bytes() == 0
    # Page cache of files read (a dataset) that the kernel would give back is room too.
    stat.write_text(f"anon 1000\nactive_file 5000\ninactive_file {2**20}\nfile 9\n")
    assert _host_memory._available_memory_bytes() == 1000, "room + reclaimable cache"
    limit.write_text(f"{2**40}\n")  # a limit above the machine's memory: the machine's
    assert _host_memory._available_memory_bytes() == 2**31
