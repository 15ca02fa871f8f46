"""The kernel probe and the capability report."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

import trio_uring
from trio_uring._features import Features, choose_strategy, features, probe

IO_URING = features().io_uring


def run_report(*args: str, env_extra: dict[str, str] | None = None) -> str:
    import os

    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run(
        [sys.executable, "-m", "trio_uring", *args],
        check=True,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    ).stdout


def test_features_is_frozen_and_cached() -> None:
    f = trio_uring.features()
    assert f is trio_uring.features()
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.strategy = "socket"  # type: ignore[misc]


@pytest.mark.skipif(not IO_URING, reason="io_uring is not usable here")
def test_this_kernel_uses_vectored_fixed_and_lacks_the_seed_patchset() -> None:
    f = features()
    assert f.strategy == "vectored-fixed"
    assert f.sendmsg_zc_fixed_vectored and f.send_zc_fixed and f.send_zc
    assert not f.fixed_provided_send_zc
    assert f.fixed_provided_detail == "not supported by this kernel (EOPNOTSUPP)"
    assert f.fixed_provided_split is None
    assert {"SEND_ZC", "SENDMSG_ZC", "ASYNC_CANCEL", "ACCEPT", "RECV"} <= f.ops
    assert f.zc_copied_on_loopback is True


def test_disable_env_forces_socket_strategy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRIO_URING_DISABLE", "1")
    f = probe()
    assert not f.io_uring and f.disabled_by_env
    assert f.strategy == "socket"
    assert "TRIO_URING_DISABLE" in (f.unavailable_reason or "")


def test_strategy_choice_follows_capabilities() -> None:
    base = probe() if IO_URING else None
    if base is None:
        pytest.skip("io_uring is not usable here")
    none = dataclasses.replace(
        base, fixed_provided_send_zc=False, sendmsg_zc_fixed_vectored=False, send_zc_fixed=False
    )
    assert choose_strategy(dataclasses.replace(base, fixed_provided_send_zc=True)) == (
        "fixed-provided-bundle"
    )
    assert choose_strategy(dataclasses.replace(none, send_zc_fixed=True)) == "fixed-single"
    assert choose_strategy(none) == "copy"
    assert choose_strategy(base, zero_copy_capable_socket=False) == "copy"
    assert choose_strategy(dataclasses.replace(base, io_uring=False)) == "socket"


def test_report_is_readable_and_json_is_complete() -> None:
    text = run_report()
    assert "send strategy:" in text
    data = json.loads(run_report("--json"))
    assert set(data) >= {f.name for f in dataclasses.fields(Features)}
    assert data["strategy"] == features().strategy


def test_report_says_why_io_uring_is_off() -> None:
    text = run_report(env_extra={"TRIO_URING_DISABLE": "1"})
    assert "unavailable" in text and "TRIO_URING_DISABLE" in text
    assert "socket" in text
    data = json.loads(run_report("--json", env_extra={"TRIO_URING_DISABLE": "1"}))
    assert data["strategy"] == "socket" and data["io_uring"] is False


def test_probed_split_names_the_shift_entries_are_written_with() -> None:
    f = features()
    assert dataclasses.replace(f, fixed_provided_split="32/32").fixed_provided_index_bits == 32
    assert dataclasses.replace(f, fixed_provided_split="20/44").fixed_provided_index_bits == 20
    # No split probed: no kernel reads the entries, the default layout serves.
    assert dataclasses.replace(f, fixed_provided_split=None).fixed_provided_index_bits == 20


def test_report_names_the_probed_split() -> None:
    text = run_report()
    split = features().fixed_provided_split
    line = next(ln for ln in text.splitlines() if ln.startswith("fixed-provided addr split:"))
    assert line.split(":", 1)[1].strip() == (split or "none probed")
    assert json.loads(run_report("--json"))["fixed_provided_split"] == split
