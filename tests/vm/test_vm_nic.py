"""Real zero copy: the guest sends over a virtio NIC to a receiver on the host.

Loopback and veth copy every zero-copy send, so on the host no notification
ever says zero copy.  Here the guest gets a virtio-net device (qemu's
userspace backend, ``vhost=off``) whose tap sits in a network namespace this
test creates, with ``nic_sink.py`` listening at 192.168.77.1 in it and the
guest at 192.168.77.2.  Those addresses exist only inside that namespace;
nothing is routed anywhere else.  The namespace, the tap and the receiver
go away on every exit path.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
from collections.abc import Iterator

import pytest
from _vm import REPO, Guest, GuestRun

SINK_ADDRESS = "192.168.77.1"
GUEST_ADDRESS = "192.168.77.2"
PREFIX = 24
GUEST_CHECKS = "tests/vm/guest_nic_checks.py"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@contextlib.contextmanager
def private_network() -> Iterator[tuple[str, str, int]]:
    """A namespace holding a tap device and the receiver: (namespace, tap, port)."""
    ns, tap = f"trio-uring-vm-{os.getpid()}", "tuvmtap0"
    ip("netns", "add", ns)
    sink = None
    try:
        for cmd in (
            ("link", "set", "lo", "up"),
            ("tuntap", "add", "dev", tap, "mode", "tap"),
            ("addr", "add", f"{SINK_ADDRESS}/{PREFIX}", "dev", tap),
            ("link", "set", tap, "up"),
        ):
            ip("netns", "exec", ns, "ip", *cmd)
        sink = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "tests/vm/nic_sink.py", SINK_ADDRESS, "0"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert sink.stdout is not None
        ready, _, _ = select.select([sink.stdout], [], [], 30)
        line = sink.stdout.readline() if ready else ""
        assert line.startswith("ready "), f"the receiver did not start: {line!r}"
        yield ns, tap, int(line.split()[1])
    finally:
        if sink is not None:
            sink.kill()
            sink.wait(timeout=30)
        ip("netns", "del", ns)


@pytest.fixture(scope="module")
def nic_run(nic_guest: Guest) -> GuestRun:
    """Boot the guest with the NIC once per kernel and run the guest checks."""
    with private_network() as (ns, tap, port):
        netdev = f"tap,id=n0,ifname={tap},script=no,downscript=no,vhost=off"
        setup = (
            f"ip addr add {GUEST_ADDRESS}/{PREFIX} dev eth0 && ip link set eth0 up && "
            f"exec env TRIO_URING_NIC_SINK={SINK_ADDRESS}:{port} "
            f"{sys.executable} tests/vm/guest_main.py {GUEST_CHECKS}"
        )
        run = nic_guest.run(
            ["bash", "-c", setup],
            prefix=["ip", "netns", "exec", ns],
            qemu_args=["-netdev", netdev, "-device", "virtio-net-pci,netdev=n0"],
            timeout=900,
        )
    print(f"guest {nic_guest.split} with a NIC: {run.seconds:.0f} s\n{run.log(4000)}")
    return run


def test_namespace_is_gone_afterwards(nic_run: GuestRun) -> None:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"trio-uring-vm-{os.getpid()}" not in listed


CHECKS = [
    "test_notifications_report_zero_copy_and_bytes_arrive[auto]",
    "test_notifications_report_zero_copy_and_bytes_arrive[fixed-provided-bundle]",
    "test_notifications_report_zero_copy_and_bytes_arrive[fixed-single]",
    "test_tiny_arena_and_slow_readers_reuse_no_slice_early",
    "test_cancelled_send_all_sends_a_clean_prefix",
    "test_peer_reset_mid_send_is_broken_resource_and_corrupts_nothing",
]


@pytest.mark.parametrize("check", CHECKS)
def test_over_the_nic(nic_run: GuestRun, check: str) -> None:
    tests = {k.rsplit("::", 1)[-1]: v for k, v in nic_run.summary["tests"].items()}
    assert check in tests, f"{check} did not run in the guest\n{nic_run.log()}"
    assert tests[check]["outcome"] == "passed", tests[check]["message"]


def test_guest_ran_with_the_seed_strategy(nic_run: GuestRun) -> None:
    f = nic_run.summary["features"]
    assert f["strategy"] == "fixed-provided-bundle"
    assert f["fixed_provided_split"] == nic_run.split
    assert nic_run.summary["pytest_rc"] == 0, nic_run.log()
