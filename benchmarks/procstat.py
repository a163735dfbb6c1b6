"""Read CPU time and memory of a server's process tree from /proc (Linux only).

A server is identified by one root PID; its "tree" is that process plus every live
descendant (found through the ppid field of /proc/PID/stat).  CPU time of the tree is
the sum of utime+stime+cutime+cstime over the live members: time of a child that has
already exited is then still counted once, in the cutime/cstime of whichever member
reaped it (Dovecot's and Postfix's masters reap their workers).

Memory is reported as the sum of VmRSS (shared pages counted once per process, so it
overstates multi-process servers) and as the sum of Pss from smaps_rollup (shared pages
divided among their users).  Peak memory over an interval: reset_hwm() sets each
process's VmHWM back to its current RSS, so VmHWM afterwards is that interval's peak;
RssSampler also polls the tree from a thread so that sampling
goes on while the asyncio loop is busy receiving data.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


def _read(path: str) -> str | None:
    """Return the text of a /proc file, or None when the process has gone."""
    try:
        with open(path, encoding="ascii", errors="replace") as fh:
            return fh.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None


def stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the ")" that ends comm (index 0 = state)."""
    text = _read(f"/proc/{pid}/stat")
    if text is None:
        return None
    return text[text.rfind(")") + 2:].split()


def children_map() -> dict[int, list[int]]:
    """Map every live ppid to the list of its children's PIDs."""
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = stat_fields(int(name))
        if fields:
            kids.setdefault(int(fields[1]), []).append(int(name))
    return kids


def status_kib(pid: int, key: str) -> int:
    """A "Vm..." value in KiB from /proc/PID/status (0 if absent or gone)."""
    text = _read(f"/proc/{pid}/status") or ""
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def rss_kib(pid: int) -> int:
    """Resident set size in KiB from /proc/PID/statm (cheap enough for 10 ms polling)."""
    text = _read(f"/proc/{pid}/statm")
    return int(text.split()[1]) * PAGE_KIB if text else 0


def pss_kib(pid: int) -> int:
    """Proportional set size in KiB from /proc/PID/smaps_rollup (0 if unavailable)."""
    text = _read(f"/proc/{pid}/smaps_rollup") or ""
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


class ProcTree:
    """The process tree of one server instance, rooted at a PID."""

    def __init__(self, root_pid: int) -> None:
        self.root_pid = root_pid

    def pids(self) -> list[int]:
        """The root PID and all its live descendants."""
        kids = children_map()
        found, todo = [], [self.root_pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo.extend(kids.get(pid, ()))
        return found

    def cpu_seconds(self) -> float:
        """User+system CPU of the tree, including reaped children."""
        ticks = 0
        for pid in self.pids():
            fields = stat_fields(pid)
            if fields:
                ticks += sum(int(v) for v in fields[11:15])
        return ticks / CLK_TCK

    def rss_kib(self, pids: list[int] | None = None) -> int:
        """Sum of VmRSS over the tree (or the given PIDs)."""
        return sum(rss_kib(pid) for pid in (pids or self.pids()))

    def pss_kib(self, pids: list[int] | None = None) -> int:
        """Sum of Pss over the tree (or the given PIDs)."""
        return sum(pss_kib(pid) for pid in (pids or self.pids()))

    def hwm_kib(self) -> dict[int, int]:
        """VmHWM (peak RSS) of each process of the tree."""
        return {pid: status_kib(pid, "VmHWM") for pid in self.pids()}

    def reset_hwm(self) -> dict[int, int]:
        """Reset each process's VmHWM to its current RSS (``5 > clear_refs``, Linux
        4.0+, needs root or ptrace rights) and return {pid: VmHWM after the reset}."""
        for pid in self.pids():
            path = f"/proc/{pid}/clear_refs"
            with contextlib.suppress(OSError), open(path, "w", encoding="ascii") as fh:
                fh.write("5")
        return self.hwm_kib()


class RssSampler(threading.Thread):
    """Poll the tree's summed VmRSS every `interval` seconds and keep the maximum."""

    def __init__(self, tree: ProcTree, interval: float = 0.01,
                 refresh: float = 0.2) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.tree = tree
        self.interval = interval
        self.refresh = refresh
        self.peak_kib = 0
        self.samples = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        """Sample until stop() is called; re-list the tree every `refresh` seconds."""
        pids, listed = self.tree.pids(), time.monotonic()
        while not self._stop_event.is_set():
            if time.monotonic() - listed > self.refresh:
                pids, listed = self.tree.pids(), time.monotonic()
            self.peak_kib = max(self.peak_kib, self.tree.rss_kib(pids))
            self.samples += 1
            self._stop_event.wait(self.interval)

    def stop(self) -> int:
        """Stop sampling, take one last sample and return the peak in KiB."""
        self._stop_event.set()
        self.join(timeout=5)
        self.peak_kib = max(self.peak_kib, self.tree.rss_kib())
        return self.peak_kib


class ProcTrees:
    """Several process trees measured as one server (Dovecot + Postfix): CPU only."""

    def __init__(self, trees: list[ProcTree]) -> None:
        self.trees = trees

    def cpu_seconds(self) -> float:
        """CPU seconds of all the trees."""
        return sum(tree.cpu_seconds() for tree in self.trees)
