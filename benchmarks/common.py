"""Shared helpers of the benchmarks: machine description, timed child processes, tables.

Every benchmark runs each measured program in its own child process and reads that child's peak
resident memory from ``os.wait4`` (the kernel's ``ru_maxrss`` of the child and everything it waited
for), so our runs and the reference's never share a process, a cache or an allocator.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ITK_GRADICON_SHARED_DATA", REPO.parent / "shared" / "data"))
LAPIRN = SHARED_DATA / "lapirn_oasis"


@dataclass
class Run:
    """One child process: wall seconds, peak resident memory (bytes), exit status, output tail."""

    label: str
    seconds: float
    peak_bytes: int
    status: int
    output: str

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / 1024 ** 3


def machine() -> Dict[str, object]:
    """CPU model, core count, torch version, GPU (if any) and the load average now."""
    model = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    info: Dict[str, object] = {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(),
                               "load_average": os.getloadavg()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        info["torch"] = None
    return info


def run_child(label: str, argv: Sequence[str], *, env: Optional[Dict[str, str]] = None,
              cwd: Optional[Path] = None, timeout: float = 3600.0) -> Run:
    """Run ``argv``; wall time from fork to exit and the child's peak RSS (``ru_maxrss``, KiB on Linux)."""
    start = time.perf_counter()
    proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})}, cwd=cwd)
    deadline = start + timeout
    output_parts: List[str] = []
    # read output until the child closes it, then reap it with wait4 for its own rusage
    assert proc.stdout is not None
    for line in proc.stdout:
        output_parts.append(line)
        if time.perf_counter() > deadline:
            proc.kill()
            break
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    return Run(label, seconds, int(usage.ru_maxrss) * 1024, proc.returncode, "".join(output_parts)[-4000:])


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    """A GitHub-flavoured Markdown table."""
    text = [[str(c) for c in header]] + [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in row]
                                        for row in rows]
    widths = [max(len(r[i]) for r in text) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in text]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def busy_cores(seconds: float = 2.0) -> float:
    """How many cores other programs kept busy over the next ``seconds`` (from ``/proc/stat``).

    Unlike the load average, this is not inflated by the benchmark's own previous run, so it can be
    read between runs. ``nan`` where ``/proc/stat`` does not exist.
    """
    def sample():
        with open("/proc/stat") as fh:
            values = [int(v) for v in fh.readline().split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)
        return sum(values), idle

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except OSError:
        return float("nan")
    elapsed = total1 - total0
    return (os.cpu_count() or 1) * (1.0 - (idle1 - idle0) / elapsed) if elapsed > 0 else 0.0


def loaded_warning(busy: Optional[Sequence[float]] = None) -> Optional[str]:
    """A warning line when other work kept more than a quarter of a core busy before a run."""
    busy = [busy_cores()] if busy is None else list(busy)
    worst = max(busy) if busy else 0.0
    if worst > 0.25:
        return (f"WARNING: other programs kept {worst:.2f} cores busy before a run: timings are not "
                "representative")
    return None


def save_json(path: Optional[str], payload: Dict[str, object]) -> None:
    if path:
        Path(path).write_text(json.dumps(payload, indent=2, default=lambda o: asdict(o)))


def published_random_weights(path: Path, *, seed: int = 11) -> Path:
    """Published-architecture weights with every tensor random, built with the reference package
    (as the tests' ``published_random_trch`` fixture builds them); reused when ``path`` exists."""
    if path.exists():
        return path
    code = (
        "import sys, torch; sys.path.insert(0, %r); from conftest import randomize; import unigradicon; "
        "torch.manual_seed(%d); "
        "net = unigradicon.make_network([1, 1, 175, 175, 175], include_last_step=True).regis_net; "
        "randomize(net, seed=%d, last_std=0.01); torch.save(net.state_dict(), %r)"
    ) % (str(REPO / "tests"), seed, seed, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-c", code], check=True)
    return path


def executable(name: str) -> str:
    """A console script of the running Python environment (``gradicon``, ``unigradicon-register``)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name
