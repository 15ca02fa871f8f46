"""Host side of the VM tier: find qemu, the seed kernels and ``run-in-vm``.

The seed patchset (provided registered buffers) exists only in the kernels
built for it, so its strategy is tested in a QEMU guest that runs this
machine's own userspace (see docs/kernel-support.rst).  Which kernel images
to boot comes from the environment, so a user's plain ``pytest`` without
them skips the tier, and CI, which sets them, fails when a guest cannot run.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

#: The addr split each kernel variable names, and the variable.
KERNEL_ENV = {"32/32": "TRIO_URING_SEED_KERNEL", "20/44": "TRIO_URING_SEED_KERNEL_20_44"}
#: ``run-in-vm`` itself, when it is not next to the kernel images.
RUN_IN_VM_ENV = "TRIO_URING_RUN_IN_VM"
#: Where the built kernels and run-in-vm usually live, relative to the repository.
SUGGESTED = {
    "TRIO_URING_SEED_KERNEL": "../shared/seedkernel/bzImage-seed",
    "TRIO_URING_SEED_KERNEL_20_44": "../shared/seedkernel/bzImage-seed-20-44",
}

MARKER = "@@trio-uring-vm-result@@"


def strict() -> bool:
    """CI with the kernels named: a guest that cannot run is a failure."""
    ci = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
    return ci and any(os.environ.get(v) for v in KERNEL_ENV.values())


def _resolve(value: str) -> Path:
    path = Path(value).expanduser()
    if path.is_absolute():
        return path
    # Relative to where pytest was started, else to the repository.
    return path.resolve() if path.exists() else (REPO / path).resolve()


@dataclasses.dataclass
class Guest:
    """How to boot one seed kernel."""

    split: str
    kernel: Path
    run_in_vm: Path

    def run(
        self,
        command: list[str],
        *,
        qemu_args: Sequence[str] = (),
        prefix: Sequence[str] = (),
        timeout: float = 900,
    ) -> GuestRun:
        """Boot, run ``command`` in the repository root, return what it printed."""
        argv = [*prefix, str(self.run_in_vm), "--kernel", str(self.kernel)]
        argv += ["--timeout", str(int(timeout))]
        for arg in qemu_args:
            argv += ["--qemu-arg", arg]
        argv += ["--", *command]
        started = time.monotonic()
        for attempt in range(1 + BOOT_RETRIES):
            proc = subprocess.run(
                argv,
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                errors="replace",
                timeout=timeout + 60,
            )
            # Under software emulation on a loaded host the guest kernel
            # sometimes oopses while booting, before the command starts:
            # that says nothing about the library, so boot once more.
            if MARKER in proc.stdout or EARLY_FAILURE not in proc.stderr or attempt:
                break
        return GuestRun(
            self.split, proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started
        )


#: run-in-vm's words for a guest that never got to run the command.
EARLY_FAILURE = "without reporting the command's status"
#: Extra boots after such an early failure.
BOOT_RETRIES = 1


@dataclasses.dataclass
class GuestRun:
    """A finished guest: its console output and the driver's summary."""

    split: str
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def summary(self) -> dict:
        """The JSON line ``guest_main.py`` printed last; AssertionError if none."""
        for line in reversed(self.stdout.splitlines()):
            if line.startswith(MARKER):
                return json.loads(line[len(MARKER) :])
        raise AssertionError(f"the guest printed no result (the guest did not run)\n{self.log()}")

    def log(self, tail: int = 12000) -> str:
        """The console (without the summary line) and stderr, for people."""
        console = "\n".join(ln for ln in self.stdout.splitlines() if not ln.startswith(MARKER))
        text = f"run-in-vm exit status {self.returncode}\n--- console\n{console}"
        text += f"\n--- stderr\n{self.stderr}"
        return text[-tail:]


def unavailable(split: str) -> str | None:
    """Why the guest for ``split``'s kernel cannot boot here, or None.

    Reasons that hold for every kernel come first, worded the same for each,
    so a machine without qemu or without the images reports one line.
    """
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 not found (apt-get install qemu-system-x86)"
    if not any(os.environ.get(v) for v in KERNEL_ENV.values()):
        names = " and ".join(KERNEL_ENV.values())
        return (
            f"{names} are not set (seed kernel images, e.g. "
            f"{SUGGESTED[KERNEL_ENV['32/32']]}; see docs/kernel-support.rst)"
        )
    var = KERNEL_ENV[split]
    value = os.environ.get(var, "")
    if not value:
        return f"{var} is not set (e.g. {var}={SUGGESTED[var]})"
    kernel = _resolve(value)
    if not kernel.is_file():
        return f"{var}={value}: no kernel image at {kernel}"
    if not run_in_vm_path(kernel).is_file():
        return f"run-in-vm not found at {run_in_vm_path(kernel)} (set {RUN_IN_VM_ENV})"
    return None


def run_in_vm_path(kernel: Path) -> Path:
    value = os.environ.get(RUN_IN_VM_ENV, "")
    return _resolve(value) if value else kernel.parent / "run-in-vm"


def guest(split: str) -> Guest:
    """The guest for ``split``'s kernel; call only when ``unavailable`` is None."""
    kernel = _resolve(os.environ[KERNEL_ENV[split]])
    return Guest(split, kernel, executable_copy(run_in_vm_path(kernel)))


_copies: dict[Path, Path] = {}


def executable_copy(script: Path) -> Path:
    """``script`` if it can run as is, else a copy with execute bits.

    The guest's kernel runs the script as its init, so it needs its execute
    bit; a read-only checkout (CI copies the kernel folder) may lack it.  The
    copy lives under the host's /tmp, which the guest sees too.
    """
    if os.access(script, os.X_OK):
        return script
    if script not in _copies:
        folder = Path(tempfile.mkdtemp(prefix="trio-uring-vm-"))
        copy = folder / "run-in-vm"
        shutil.copyfile(script, copy)
        copy.chmod(copy.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        folder.chmod(0o755)
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        _copies[script] = copy
    return _copies[script]


def nic_unavailable() -> str | None:
    """Why this host cannot give a guest a NIC in a private namespace, or None."""
    if os.geteuid() != 0:
        return "the NIC tests create a network namespace and a tap device: run as root"
    if shutil.which("ip") is None:
        return "the 'ip' command is missing (apt-get install iproute2)"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing (no tun/tap support)"
    return None
