"""Which addresses processes use: the loopback checks of the Ray tests.

Two views, each covering the other's blind spot:
  /proc (no iproute2)  every socket a process holds now, C++ servers included: /proc/net/{tcp,tcp6,
                       udp,udp6} list the sockets of this network namespace with their inodes, and the
                       links /proc/<pid>/fd/* -> `socket:[inode]` name those a process holds. Sampled, so
                       it sees what lasts (listeners, connections), not a probe that fails at once.
  an audit hook        every connect, bind, sendto and name lookup a Python process makes, however short
                       (socketaudit/sitecustomize.py, in the processes started with `audited`).
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
AUDIT = Path(__file__).parent / "socketaudit"  # its sitecustomize.py logs socket calls
AUDIT_LOG = "MIMI_TEST_SOCKET_LOG"
TABLES = ("tcp", "tcp6", "udp", "udp6")
TCP_LISTEN = "0A"  # the `st` column of a listening TCP socket

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Socket:
    """One row of a /proc/net table: addresses as (ip, port), `state` as the hex `st` column."""

    table: str
    local: tuple[IPAddress, int]
    remote: tuple[IPAddress, int]
    state: str
    inode: int

    @property
    def listening(self) -> bool:
        return self.table.startswith("tcp") and self.state == TCP_LISTEN

    def __str__(self) -> str:
        (lip, lport), (rip, rport) = self.local, self.remote
        kind = "listening" if self.listening else f"state {self.state}"
        return f"{self.table} {lip}:{lport} -> {rip}:{rport} ({kind})"


def parse_address(field: str) -> tuple[IPAddress, int]:
    """`0100007F:1F90` → (127.0.0.1, 8080). The address is in 32-bit words of host (little-endian) order."""
    hex_ip, hex_port = field.split(":")
    raw = bytes.fromhex(hex_ip)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(words), int(hex_port, 16)


def read_table(table: str) -> list[Socket]:
    lines = (PROC / "net" / table).read_text().splitlines()[1:]  # the first line holds the column names
    sockets = []
    for line in lines:
        fields = line.split()
        local, remote, state, inode = fields[1], fields[2], fields[3], int(fields[9])
        sockets.append(Socket(table, parse_address(local), parse_address(remote), state, inode))
    return sockets


def all_sockets() -> dict[int, Socket]:
    """Every TCP and UDP socket of this network namespace, by inode (0: a socket in TIME_WAIT, no owner)."""
    return {s.inode: s for table in TABLES for s in read_table(table) if s.inode}


def socket_inodes(pid: int) -> set[int]:
    """The inodes of the sockets process `pid` holds (empty if it is gone or not ours to read)."""
    inodes = set()
    try:
        for fd in (PROC / str(pid) / "fd").iterdir():
            target = _readlink(fd)
            if target.startswith("socket:["):
                inodes.add(int(target[len("socket:[") : -1]))
    except OSError:
        pass
    return inodes


def session_of(pid: int) -> int | None:
    """The session id of process `pid` (None if it is gone)."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[3])  # after the command name: state, ppid, pgrp, session


def session_pids(sessions: set[int]) -> dict[int, int]:
    """Every process in one of `sessions`, with its session: Ray's processes change their group, never
    their session."""
    pids = (int(p.name) for p in PROC.iterdir() if p.name.isdigit())
    return {pid: sid for pid in pids if (sid := session_of(pid)) in sessions}


def listener_pid(port: int) -> int | None:
    """The process listening on TCP `port`, on whichever address (None if none is seen)."""
    inodes = {s.inode for s in all_sockets().values() if s.listening and s.local[1] == port}
    for pid in (int(p.name) for p in PROC.iterdir() if p.name.isdigit()):
        if socket_inodes(pid) & inodes:
            return pid
    return None


def is_loopback_host(host: str) -> bool:
    """Whether `host` (an address or a name, as a socket call got it) is loopback: "localhost" is, "" and
    "None" (any address: a server on every interface, a lookup for one) are not, nor any other name."""
    if host == "localhost":
        return True
    try:
        return is_loopback(ipaddress.ip_address(host.split("%")[0]))  # "%eth0": an IPv6 scope
    except ValueError:
        return False


def is_loopback(ip: IPAddress) -> bool:
    """127.0.0.0/8, ::1 and ::ffff:127.x.y.z; an unspecified address (0.0.0.0, ::) is not."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def off_loopback(socket: Socket) -> bool:
    """Whether `socket` is bound or connected outside loopback (a listener's remote end is not one)."""
    if not is_loopback(socket.local[0]):
        return True
    unconnected = socket.listening or socket.remote[1] == 0  # a listener, or a UDP socket never connected
    return not unconnected and not is_loopback(socket.remote[0])


def sessions_sockets(sessions: set[int]) -> dict[tuple[int, int], list[Socket]]:
    """The TCP and UDP sockets each process of `sessions` holds now, by (session, pid)."""
    table = all_sockets()
    held = {
        (sid, pid): [table[i] for i in socket_inodes(pid) if i in table]
        for pid, sid in session_pids(sessions).items()
    }
    return {key: sockets for key, sockets in held.items() if sockets}


def command_line(pid: int) -> str:
    """The first 100 characters of the command line of `pid` ("?" if it is gone)."""
    try:
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return "?"
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()[:100]


def _readlink(path: Path) -> str:
    try:
        return str(path.readlink())
    except OSError:
        return ""


def watch(sessions: set[int], process: subprocess.Popen, seconds: float) -> tuple[set[int], dict[str, str]]:
    """Sample the sockets of `sessions` every 0.1 s until `process` exits (at most `seconds`).

    Returns the sessions seen holding a socket, and each socket seen off loopback with the command
    line of the first process seen holding it.
    """
    seen: set[int] = set()
    outside: dict[str, str] = {}
    deadline = time.monotonic() + seconds
    while process.poll() is None and time.monotonic() < deadline:
        for (sid, pid), sockets in sessions_sockets(sessions).items():
            seen.add(sid)
            for s in filter(off_loopback, sockets):
                outside.setdefault(str(s), command_line(pid))
        time.sleep(0.1)
    return seen, outside


def report(outside: dict[str, str], most: int = 30) -> str:
    """What `watch` or `logged_off_loopback` found, one a line with its process, at most `most` lines."""
    lines = [f"{s}  [{command}]" for s, command in sorted(outside.items())]
    more = [f"... and {len(lines) - most} more"] if len(lines) > most else []
    return "\n".join(lines[:most] + more)


def audited(environment: dict[str, str], log: Path) -> dict[str, str]:
    """`environment` in which every Python process appends its socket calls to `log` (see AUDIT)."""
    path = os.pathsep.join(p for p in (str(AUDIT), environment.get("PYTHONPATH", "")) if p)
    return {**environment, "PYTHONPATH": path, AUDIT_LOG: str(log)}


def logged_off_loopback(log: Path) -> dict[str, str]:
    """The calls in `log` to an address or name off loopback, as "event host port", with the pid of the
    first process seen making each (a missing log: none)."""
    outside: dict[str, str] = {}
    lines = log.read_text().splitlines() if log.exists() else []
    for line in lines:
        pid, event, host, port = line.split(" ")
        if not is_loopback_host(host):
            outside.setdefault(f"{event} {host!r} {port}", f"pid {pid}")
    return outside
