"""Free loopback ports for the test servers."""

from __future__ import annotations

import random
import socket
from pathlib import Path

from tests.servers.process import ServerStartError

SEAWEED_GRPC_OFFSET = 10000  # SeaweedFS's gRPC port = HTTP port + 10000


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ephemeral_low() -> int:
    try:
        low = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0]
        return int(low)
    except (OSError, ValueError, IndexError):
        return 32768


def free_seaweed_ports(n: int) -> list[int]:
    """``n`` distinct free ports whose ``port + 10000`` (SeaweedFS gRPC) is free too.

    Both the HTTP and gRPC ports are taken below the kernel's ephemeral range so
    that client sockets cannot grab them between this check and the bind.
    """
    high = min(_ephemeral_low(), 65536) - SEAWEED_GRPC_OFFSET - 1
    low = 12000
    if high <= low:  # unusual port range: fall back to anything that fits
        low, high = 1024, 65535 - SEAWEED_GRPC_OFFSET
    rng = random.Random()
    chosen: list[int] = []
    taken: set[int] = set()
    for _ in range(5000):
        p = rng.randint(low, high)
        g = p + SEAWEED_GRPC_OFFSET
        if p in taken or g in taken:
            continue
        if _port_free(p) and _port_free(g):
            chosen.append(p)
            taken.update({p, g})
            if len(chosen) == n:
                return chosen
    raise ServerStartError(f"could not find {n} free port pairs (port, port+10000)")
