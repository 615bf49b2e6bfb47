"""Available host memory: /proc/meminfo, cgroup limits (containers, batch jobs), macOS vm_stat."""

from __future__ import annotations

from pathlib import Path

from itk_gradicon import resources


def _cgroup(tmp_path: Path, files: dict, proc: str) -> tuple:
    root = tmp_path / "cgroup"
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    self_cgroup = tmp_path / "self_cgroup"
    self_cgroup.write_text(proc)
    return root, self_cgroup


def test_cgroup_v2_limit_minus_usage(tmp_path):
    root, proc = _cgroup(tmp_path, {"job/memory.max": "8589934592\n", "job/memory.current": "1073741824\n"},
                         "0::/job\n")
    assert resources.cgroup_available(root, proc) == 7 * 1024 ** 3


def test_cgroup_without_a_limit(tmp_path):
    root, proc = _cgroup(tmp_path, {"job/memory.max": "max\n", "job/memory.current": "5\n"}, "0::/job\n")
    assert resources.cgroup_available(root, proc) is None


def test_cgroup_v1_limit(tmp_path):
    root, proc = _cgroup(tmp_path, {"memory/slurm/job7/memory.limit_in_bytes": "4294967296",
                                    "memory/slurm/job7/memory.usage_in_bytes": "294967296",
                                    "memory/memory.limit_in_bytes": str(1 << 62)},
                         "12:memory:/slurm/job7\n3:cpu,cpuacct:/slurm/job7\n")
    assert resources.cgroup_available(root, proc) == 4_000_000_000


def test_vm_stat_output():
    text = """Mach Virtual Memory Statistics: (page size of 16384 bytes)
Pages free:                               10000.
Pages active:                            200000.
Pages inactive:                           30000.
Pages speculative:                         2000.
Pages purgeable:                            500.
"""
    assert resources.parse_vm_stat(text) == (10000 + 30000 + 2000 + 500) * 16384
    assert resources.parse_vm_stat("garbage") is None


def test_this_machine_answers():
    available, where = resources.available_host_memory()
    assert available is not None and available > 0 and where.startswith("RAM")


def test_a_platform_without_a_query_skips_the_check(monkeypatch):
    import torch

    from itk_gradicon import devices, registration

    monkeypatch.setattr(devices, "available_memory_bytes", lambda device: (None, "RAM (unknown)"))
    registration.check_memory({"network": 1 << 50, "host": 1 << 50}, torch.device("cpu"))  # no error


def test_for_each_slab_covers_every_row_once_whatever_the_threads():
    import numpy as np

    from itk_gradicon.resources import for_each_slab

    for threads in (1, 2, 3):
        seen = np.zeros(103, dtype=int)

        def work(rows, seen=seen):
            seen[rows] += 1

        for_each_slab(103, 10, work, threads=threads)
        assert np.all(seen == 1)


def test_for_each_slab_raises_the_error_of_a_slab():
    import pytest

    from itk_gradicon.resources import for_each_slab

    def work(rows):
        if rows.start == 20:
            raise ValueError("slab 20")

    with pytest.raises(ValueError, match="slab 20"):
        for_each_slab(50, 10, work, threads=2)
