"""The suite's own network: a namespace with nothing but loopback.

WebRTC peers gather a candidate on every interface they see (aioice skips only 127.0.0.1), so
a test that let them see the machine's interfaces could send media off the machine. The suite
therefore moves itself, before any test runs, into a new network namespace whose only
interface is ``lo``: every server, Redis, PostgreSQL and peer the tests start then lives on
loopback by construction. That needs ``CAP_SYS_ADMIN`` (root); without it the suite runs where
it is and the tests that need the namespace skip, saying why (:func:`loopback_only_reason`).
Set ``CREALIA_TEST_NETNS=0`` to keep the suite in the machine's namespace.
"""

from __future__ import annotations

import ctypes
import os
import socket
import subprocess

CLONE_NEWNET = 0x40000000

#: Why the suite could not move into a loopback-only namespace (None: it did, or was there).
_refused: str | None = None


def enter_loopback_namespace() -> None:
    """Move this process (and everything it starts from now on) into a new network namespace
    with only ``lo``, brought up. Call it before any thread starts. Never raises: what stopped
    it is kept for :func:`loopback_only_reason`."""
    global _refused
    if only_loopback():
        return
    if os.environ.get("CREALIA_TEST_NETNS") == "0":
        _refused = "CREALIA_TEST_NETNS=0 keeps the suite in the machine's network namespace"
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        error = os.strerror(ctypes.get_errno())
        _refused = f"cannot create a network namespace (unshare: {error}; run as root)"
        return
    try:
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True, capture_output=True,
                       timeout=10)  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        _refused = f"cannot bring up lo in the new network namespace ({exc}; install iproute2)"


def only_loopback() -> bool:
    """Whether the only network interface this process sees is ``lo``, and it is up."""
    names = [name for _index, name in socket.if_nameindex()]
    if names != ["lo"]:
        return False
    with open("/sys/class/net/lo/flags") as flags:
        return bool(int(flags.read(), 16) & 0x1)  # IFF_UP


def loopback_only_reason() -> str | None:
    """Why this process is not in a loopback-only network namespace (None: it is)."""
    if only_loopback():
        return None
    return _refused or "the network namespace has interfaces other than lo"
