"""Emulated hosts on one machine: network namespaces joined by a bridge over rate-limited links.

Host ``i`` is the namespace ``trainops-h{i}`` with one interface ``eth0`` at
``10.77.0.{i+1}/24``, the far end of a veth pair whose near end ``trainops-v{i}`` sits on
the bridge ``trainops-br`` in the root namespace. Each host's link is limited with a token
bucket (``tc ... tbf``) on both ends of its veth, so egress from the host (its ``eth0``)
and ingress to it (the bridge side) each get ``rate``: a transfer between two hosts crosses
two limited links, the sender's upload and the receiver's download, as on real machines with
their own uplinks.

Needs root (CAP_NET_ADMIN) and ``ip``/``tc`` (iproute2). Everything is named with the
``trainops-`` prefix so :func:`cleanup` can remove leftovers of a killed harness;
``TRAINOPS_NETNS_PREFIX`` (at most 6 characters, as Linux caps interface names at 15) sets
another, so two harnesses on one machine never touch each other's namespaces.

    with Hosts(2, rate="100mbit") as hosts:
        procs = hosts.launch_torchrun(["--exchange", "fp4_e3m0", "--out-dir", out], max_restarts=1)
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

__all__ = ["Hosts", "cleanup", "leftovers", "netns_permitted", "HostsError", "descendants", "cmdline"]

PREFIX = os.environ.get("TRAINOPS_NETNS_PREFIX", "trainops-")
if PREFIX != "trainops-" and (len(PREFIX) > 6 or not PREFIX.replace("-", "").isalnum()):
    raise ValueError(f"TRAINOPS_NETNS_PREFIX={PREFIX!r}: at most 6 letters, digits or '-'")
BRIDGE = PREFIX + "br"
SUBNET = "10.77.0"


class HostsError(RuntimeError):
    """A namespace, link or qdisc could not be set up."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise HostsError(f"ip {' '.join(args)}: {proc.stderr.strip() or proc.returncode}")
    return proc


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise HostsError(f"{' '.join(cmd)}: {proc.stderr.strip() or proc.returncode}")


def namespace(i: int) -> str:
    return f"{PREFIX}h{i}"


def address(i: int) -> str:
    return f"{SUBNET}.{i + 1}"


def leftovers() -> tuple[list[str], list[str]]:
    """(namespaces, root-namespace links) that carry the harness prefix."""
    ns = [ln.split()[0] for ln in _ip("netns", "list", check=False).stdout.splitlines()
          if ln.split() and ln.split()[0].startswith(PREFIX)]
    links = []
    for ln in _ip("-o", "link", "show", check=False).stdout.splitlines():
        parts = ln.split(":")
        if len(parts) > 1:
            name = parts[1].strip().split("@")[0]
            if name.startswith(PREFIX):
                links.append(name)
    return ns, links


def cleanup() -> list[str]:
    """Remove every ``trainops-*`` namespace (killing what runs in it) and link; returns what went."""
    ns, links = leftovers()
    for name in ns:
        pids = _ip("netns", "pids", name, check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        _ip("netns", "del", name, check=False)
    for name in links:  # deleting one end of a veth removes its peer; the bridge last
        _ip("link", "del", name, check=False)
    return ns + links


def netns_permitted() -> tuple[bool, str]:
    """Whether this process may create network namespaces (and why not)."""
    probe = f"{PREFIX}probe{os.getpid()}"[:40]
    proc = _ip("netns", "add", probe, check=False)
    if proc.returncode != 0:
        return False, f"`ip netns add` is not permitted here: {proc.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    ok = subprocess.run(["tc", "-V"], capture_output=True).returncode == 0
    return (True, "") if ok else (False, "tc (iproute2) is not installed")


class Hosts:
    """N emulated hosts; a context manager that removes them on exit, exceptions, SIGTERM and SIGINT.

    ``rate`` / ``burst`` / ``latency`` are tc tbf parameters (``latency`` bounds the queue,
    it does not add delay); ``rate=None`` leaves the links unlimited."""

    def __init__(self, n: int, rate: str | None = "100mbit", burst: str = "64kb", latency: str = "50ms"):
        if not 1 <= n <= 250:
            raise ValueError(f"Hosts: n must be 1..250, got {n}")
        self.n, self.rate, self.burst, self.latency = n, rate, burst, latency
        self.procs: list[subprocess.Popen] = []
        self._old_handlers: dict = {}

    # -- set-up and tear-down ------------------------------------------------------------
    def __enter__(self) -> "Hosts":
        ns, links = leftovers()
        if ns or links:
            raise HostsError(f"leftovers of another harness: {ns + links}; remove them with "
                             "`python -m benchmarks.wan.run --cleanup`")
        if threading_main():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old_handlers[s] = signal.signal(s, self._on_signal)
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _on_signal(self, signum, frame):
        self.close()
        old = self._old_handlers.get(signum)
        if callable(old):
            old(signum, frame)
        raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)

    def _create(self) -> None:
        _ip("link", "add", BRIDGE, "type", "bridge")
        _ip("link", "set", BRIDGE, "up")
        for i in range(self.n):
            ns, near = namespace(i), f"{PREFIX}v{i}"
            _ip("netns", "add", ns)
            _ip("link", "add", near, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("link", "set", near, "master", BRIDGE)
            _ip("link", "set", near, "up")
            _ip("-n", ns, "addr", "add", f"{address(i)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            if self.rate:
                tbf = ["root", "tbf", "rate", self.rate, "burst", self.burst, "latency", self.latency]
                _run(["tc", "qdisc", "add", "dev", near, *tbf])  # towards host i
                _run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", *tbf])  # from host i

    def close(self) -> None:
        """Kill what was launched, delete the namespaces, links and bridge. Idempotent."""
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        cleanup()
        for s, h in self._old_handlers.items():
            signal.signal(s, h)
        self._old_handlers.clear()

    # -- running things on hosts -----------------------------------------------------------
    def address(self, i: int) -> str:
        return address(i)

    def namespace(self, i: int) -> str:
        return namespace(i)

    def popen(self, i: int, cmd: list[str], env: dict | None = None, **kw) -> subprocess.Popen:
        """Start ``cmd`` inside host ``i`` (own process group, so it can be killed as a whole)."""
        p = subprocess.Popen(["ip", "netns", "exec", namespace(i), *cmd], env=env, start_new_session=True, **kw)
        self.procs.append(p)
        return p

    def run(self, i: int, cmd: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", namespace(i), *cmd], **kw)

    def torchrun_cmd(self, i: int, train_args: list[str], port: int = 29400, max_restarts: int = 0) -> list[str]:
        """``torchrun`` for host ``i`` with a c10d rendezvous on host 0. The machine's hostname
        names none of the namespaces, so host 0 is told it hosts the store (``is_host``) and
        each host gives its own address (``--local-addr``) for the workers' MASTER_ADDR."""
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(self.n), "--node-rank", str(i),
                "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{address(0)}:{port}",
                "--rdzv-id", "trainops-wan", "--rdzv-conf", f"is_host={'true' if i == 0 else 'false'}",
                "--local-addr", address(i), "--max-restarts", str(max_restarts),
                "--monitor-interval", "0.2", "-m", "trainops.train", *train_args]

    def launch_torchrun(self, train_args: list[str], port: int = 29400, max_restarts: int = 0,
                        env: dict | None = None, stdout_per_host: list | None = None,
                        **kw) -> list[subprocess.Popen]:
        """``trainops train`` on every host; gloo talks over each namespace's ``eth0``.
        ``stdout_per_host``: one open file per host (files, not pipes: an unread pipe of
        one host fills up and blocks it while the caller waits on another)."""
        env = {**os.environ, "GLOO_SOCKET_IFNAME": "eth0", "OMP_NUM_THREADS": "1", **(env or {})}
        return [self.popen(i, self.torchrun_cmd(i, train_args, port, max_restarts), env=env,
                           **({"stdout": stdout_per_host[i]} if stdout_per_host else {}), **kw)
                for i in range(self.n)]


def threading_main() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), depth first."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/task/{p}/children") as fh:
                kids = [int(x) for x in fh.read().split()]
        except OSError:
            kids = []
        out += kids
        todo += kids
    return out


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
