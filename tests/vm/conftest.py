"""The VM tier: tests that boot the seed kernels in a QEMU guest.

Every test here carries the ``vm`` marker (deselect with ``-m "not vm"``).
Where a guest cannot boot (no qemu, kernel images not named by
``TRIO_URING_SEED_KERNEL`` / ``TRIO_URING_SEED_KERNEL_20_44``), the tier is
skipped and the run ends with one line saying why; under CI with the images
named, the same problem fails the tests instead, so a broken set-up cannot
pass as a skipped tier.

Inside the guest (``RUN_IN_VM`` set) this file only lends its directory to
the guest-side check files.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from _vm import KERNEL_ENV, Guest, guest, nic_unavailable, strict, unavailable

HERE = Path(__file__).resolve().parent
IN_GUEST = bool(os.environ.get("RUN_IN_VM"))
SPLIT_IDS = {split: split.replace("/", "-") for split in KERNEL_ENV}

_skipped: pytest.StashKey[set[str]] = pytest.StashKey()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_skipped] = set()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if IN_GUEST:
        return
    for item in items:
        if HERE in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.vm)


def require(request: pytest.FixtureRequest, why: str | None) -> None:
    """Skip (or, in CI with the kernels named, fail) when ``why`` says a need is unmet."""
    if why is None:
        return
    if strict():
        pytest.fail(f"VM tier cannot run: {why}", pytrace=False)
    request.config.stash[_skipped].add(why)
    pytest.skip(f"VM tier skipped: {why}")


@pytest.fixture(scope="session", params=list(KERNEL_ENV), ids=list(SPLIT_IDS.values()))
def seed_guest(request: pytest.FixtureRequest) -> Guest:
    """A bootable seed kernel, once per addr split (32/32 as posted, 20/44)."""
    require(request, unavailable(request.param))
    return guest(request.param)


@pytest.fixture(scope="session")
def nic_guest(request: pytest.FixtureRequest, seed_guest: Guest) -> Guest:
    """``seed_guest`` on a host that can give it a virtio NIC in a private namespace."""
    require(request, nic_unavailable())
    return seed_guest


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    for why in sorted(config.stash.get(_skipped, set())):
        terminalreporter.write_line(f"VM tier skipped: {why}")
