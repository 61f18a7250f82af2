#!/usr/bin/env python3
"""The images' HEALTHCHECK: GET /health on the port that Cronnx serves HTTP on in this container.

The ports are read from /proc (the listening TCP sockets held by the container's processes), not
configured, so the check follows --port, --grpc-port, the mounted config and `docker run --init`
alike. Cronnx may listen on two ports, HTTP's and gRPC's: each is asked for /health in turn, and
the gRPC port, which speaks only HTTP/2, answers an HTTP/1.1 request with bytes that are no HTTP
status line. Exit 0 when one answers 200, 1 otherwise (Docker's contract).
"""

from __future__ import annotations

import http.client
import os
import socket
import sys
import time
import urllib.error
import urllib.request

TCP_LISTEN = "0A"  # the state column of /proc/net/tcp*
TABLES = (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6))
LOOPBACK = {socket.AF_INET: "127.0.0.1", socket.AF_INET6: "::1"}
# All the ports together, within the HEALTHCHECK's --timeout of 5 s.
TIMEOUT_S = 4.0


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


def health_urls() -> list[str]:
    """The URL of /health on each listening socket found, in the order of /proc's tables;
    SystemExit when there is none."""
    inodes = socket_inodes()
    urls: list[str] = []
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
                    url = f"http://{f'[{host}]' if family == socket.AF_INET6 else host}:{int(hex_port, 16)}/health"
                    if url not in urls:
                        urls.append(url)
        except FileNotFoundError:
            continue  # no IPv6 in this kernel
    if not urls:
        sys.exit("unhealthy: no process in this container listens on a TCP port")
    return urls


def status_of(url: str, timeout_s: float) -> int | str:
    """The HTTP status `url` answers, or why there is none."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except http.client.HTTPException:
        return "no HTTP/1.1 answer (gRPC's port, say)"
    except OSError as exc:  # URLError derives from it
        return str(exc)


def main() -> None:
    deadline = time.monotonic() + TIMEOUT_S
    answers = []
    for url in health_urls():
        status = status_of(url, max(deadline - time.monotonic(), 0.1))
        if status == 200:
            print(f"{url}: 200")
            sys.exit(0)
        answers.append(f"{url}: {status}")
    sys.exit("unhealthy: " + "; ".join(answers))


if __name__ == "__main__":
    main()
