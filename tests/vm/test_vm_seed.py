"""The seed strategy end to end: each seed kernel boots once and runs the suite.

One guest per kernel (a boot costs seconds, and the guest emulates its CPU)
runs ``python -m trio_uring --json`` and a chosen part of the stream suite
with ``fixed-provided-bundle`` found by the library itself: trio's stream
conformance checks, integrity through tiny arenas (hypothesis), the slice
reuse invariant, cancellation storms, peer resets, ``reserve()``, and the
checks in ``guest_seed_checks.py`` that show why the addr split is probed.
"""

from __future__ import annotations

import sys

import pytest
from _vm import Guest, GuestRun

BUNDLE = "fixed-provided-bundle"

#: Files and tests run in the guest.  Parametrised tests run for the bundle
#: strategy only (the host runs the others); the named tests use the
#: strategy the library picks, which in the guest is the bundle one.
GUEST_FILES = [
    "tests/test_stream.py",
    "tests/test_reuse_invariant.py",
    "tests/test_reliability_cancellation.py",
    "tests/test_reliability_peer.py",
    "tests/test_reliability_integrity.py",
    "tests/test_reliability_exhaustion.py",
    "tests/test_reserve.py",
    "tests/vm/guest_seed_checks.py",
]
GUEST_SELECTION = " or ".join(
    [
        BUNDLE,
        "test_cancel_send_all",
        "test_cancel_aclose_with_ops_in_flight",
        "test_two_slice_arena_under_64_streams",
        "guest_seed_checks",
    ]
)
#: Tests that must have passed in the guest (not merely not failed).
MUST_PASS = [
    f"test_trio_half_closeable_stream_conformance[{BUNDLE}-tcp]",
    f"test_cancelled_send_all_breaks_the_stream_and_returns_slices[{BUNDLE}]",
    f"test_reset_by_peer_is_broken_resource_error_with_cause[{BUNDLE}]",
    f"test_slices_are_not_reused_before_their_notification[{BUNDLE}]",
    "test_cancel_send_all[stopped]",
    "test_cancel_aclose_with_ops_in_flight",
    f"test_reset_mid_send[{BUNDLE}]",
    f"test_peer_process_killed_mid_send[{BUNDLE}]",
    f"test_integrity_under_cancellation_and_resets[{BUNDLE}]",
    "test_two_slice_arena_under_64_streams",
    f"test_reserved_bytes_arrive[{BUNDLE}]",
    f"test_reserved_sends_interleave_with_send_all_intact[{BUNDLE}]",
    "test_the_seed_strategy_and_its_split_are_chosen_automatically",
    "test_any_payload_through_a_tiny_arena_arrives_intact",
    "test_bundles_after_plain_sends_arrive_intact[arena-full]",
    "test_bundles_after_plain_sends_arrive_intact[send-file]",
]
#: Sizes of the reliability tests in the guest, where the CPU is emulated.
GUEST_ENV = ["TRIO_URING_CANCEL_ITERS=100", "TRIO_URING_INTEGRITY_CHAOS=20"]


@pytest.fixture(scope="module")
def seed_run(seed_guest: Guest) -> GuestRun:
    """Boot the kernel once and run everything this module checks."""
    command = ["env", *GUEST_ENV, sys.executable, "tests/vm/guest_main.py"]
    command += ["-k", GUEST_SELECTION, *GUEST_FILES]
    run = seed_guest.run(command, timeout=900)
    print(f"guest {seed_guest.split}: {run.seconds:.0f} s\n{run.log(4000)}")
    return run


def outcomes(run: GuestRun) -> dict[str, dict[str, str]]:
    """Guest test results keyed by the test's name (with its parameters)."""
    return {key.rsplit("::", 1)[-1]: value for key, value in run.summary["tests"].items()}


def test_report_names_the_seed_strategy_and_the_probed_split(seed_run: GuestRun) -> None:
    summary = seed_run.summary
    f = summary["features"]
    assert summary["kernel"].endswith("-seed"), summary["kernel"]
    assert f["fixed_provided_send_zc"] is True, f.get("fixed_provided_detail", f)
    assert f["strategy"] == BUNDLE
    assert f["fixed_provided_split"] == seed_run.split
    assert seed_run.split in f["fixed_provided_detail"]


def test_stream_suite_passes_with_the_seed_strategy(seed_run: GuestRun) -> None:
    results = outcomes(seed_run)
    failed = {name: r["message"] for name, r in results.items() if r["outcome"] == "failed"}
    assert not failed, "\n\n".join(f"{name}:\n{msg}" for name, msg in failed.items())
    assert seed_run.summary["pytest_rc"] == 0, seed_run.log()
    not_passed = [n for n in MUST_PASS if results.get(n, {}).get("outcome") != "passed"]
    assert not not_passed, f"did not pass in the guest: {not_passed}\n{sorted(results)}"
    ran_bundle = [n for n, r in results.items() if BUNDLE in n and r["outcome"] == "passed"]
    assert len(ran_bundle) >= 30, ran_bundle


@pytest.mark.parametrize("split", ["probed", "other"])
def test_entries_in_the_other_split_send_wrong_bytes(seed_run: GuestRun, split: str) -> None:
    name = f"test_entries_in_the_other_split_send_wrong_bytes[{split}]"
    result = outcomes(seed_run).get(name)
    assert result is not None, f"{name} did not run in the guest\n{seed_run.log()}"
    assert result["outcome"] == "passed", result["message"]
