#!/usr/bin/env python3
"""The images' HEALTHCHECK: GET /health on the port that Cronnx listens on in this container.

The port is read from /proc (the listening TCP sockets held by the container's processes), not
configured, so the check follows --port, the mounted config and `docker run --init` alike.
Exit 0 when /health answers 200, 1 otherwise (Docker's contract).
"""

from __future__ import annotations

import os
import socket
import sys
import urllib.request

TCP_LISTEN = "0A"  # the state column of /proc/net/tcp*
TABLES = (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6))
LOOPBACK = {socket.AF_INET: "127.0.0.1", socket.AF_INET6: "::1"}


def socket_inodes() -> set[str]:
    """The inodes of the sockets open in the processes this user may inspect (in a container:
    its own processes, whatever the network namespace shows of the host's)."""
    inodes = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue  # gone, or another user's
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[len("socket:["):-1])
    return inodes


def decode_address(hex_address: str, family: int) -> str:
    """/proc/net/tcp* print addresses as 32-bit words in the machine's (little-endian) order."""
    raw = b"".join(bytes.fromhex(hex_address[i:i + 8])[::-1] for i in range(0, len(hex_address), 8))
    return socket.inet_ntop(family, raw)


def health_url() -> str:
    """The URL of /health on the first listening socket found; SystemExit when there is none."""
    inodes = socket_inodes()
    for table, family in TABLES:
        try:
            with open(table) as rows:
                next(rows)  # the header
                for row in rows:
                    fields = row.split()
                    if fields[3] != TCP_LISTEN or fields[9] not in inodes:
                        continue
                    hex_address, hex_port = fields[1].split(":")
                    host = decode_address(hex_address, family)
                    if host in ("0.0.0.0", "::"):
                        host = LOOPBACK[family]
                    return f"http://{f'[{host}]' if family == socket.AF_INET6 else host}:{int(hex_port, 16)}/health"
        except FileNotFoundError:
            continue  # no IPv6 in this kernel
    sys.exit("unhealthy: no process in this container listens on a TCP port")


def main() -> None:
    url = health_url()
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            status = response.status
    except OSError as exc:  # URLError and HTTPError derive from it
        sys.exit(f"unhealthy: {url}: {exc}")
    print(f"{url}: {status}")
    sys.exit(0 if status == 200 else 1)


if __name__ == "__main__":
    main()
