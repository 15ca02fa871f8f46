"""Run inside the VM guest: report the kernel's features, run pytest, summarise.

The guest's file system is a throwaway overlay, so everything the host needs
comes back on the console: pytest's own output for people, then one line
starting with ``MARKER`` holding JSON for the host-side test to check.

Usage (from the repository root, in the guest):
``python tests/vm/guest_main.py [PYTEST ARGS...]``
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

MARKER = "@@trio-uring-vm-result@@"


def junit_outcomes(path: str) -> dict[str, dict[str, str]]:
    """``{test id: {"outcome": ..., "message": ...}}`` from a JUnit XML file."""
    out: dict[str, dict[str, str]] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            child = case.find(tag)
            if child is not None:
                outcome = "failed" if tag in ("failure", "error") else "skipped"
                message = (child.get("message") or "") + "\n" + (child.text or "")
                break
        out[test_id] = {"outcome": outcome, "message": message[-3000:]}
    return out


def main(pytest_args: list[str]) -> int:
    started = time.monotonic()
    report = subprocess.run(
        [sys.executable, "-m", "trio_uring", "--json"], capture_output=True, text=True
    )
    try:
        features = json.loads(report.stdout)
    except ValueError:
        features = {"error": report.stdout + report.stderr}
    print(report.stdout, flush=True)
    tests: dict[str, dict[str, str]] = {}
    rc = None
    if pytest_args:
        xml = os.path.join(tempfile.mkdtemp(), "junit.xml")
        rc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-p",
                "no:cacheprovider",
                "-q",
                "-rfEs",
                "--durations=10",
                f"--junitxml={xml}",
                *pytest_args,
            ]
        ).returncode
        if os.path.exists(xml):
            tests = junit_outcomes(xml)
    summary = {
        "kernel": platform.release(),
        "features": features,
        "pytest_rc": rc,
        "tests": tests,
        "seconds": round(time.monotonic() - started, 1),
    }
    print(MARKER + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
