"""``python -m trio_uring``: report what this kernel lets trio_uring do."""

from __future__ import annotations

import argparse
import json
import sys

from ._features import DISABLE_ENV, Features, features


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def render(f: Features) -> str:
    lines = [f"trio_uring capability report (kernel {f.kernel})", ""]
    if not f.io_uring:
        lines += [
            f"{'io_uring:':<27}unavailable",
            f"{'  why:':<27}{f.unavailable_reason}",
            f"{'send strategy:':<27}socket (trio socket sends; the same API, no io_uring)",
        ]
        if f.disabled_by_env:
            lines.append(f"  unset {DISABLE_ENV} to use io_uring")
        return "\n".join(lines)
    accepted = ["|".join(a) or "(none)" for a in f.setup_flags_accepted]
    copied = {None: "not probed", True: "copied (expected without a real NIC)", False: "zero copy"}
    rows = [
        ("io_uring", "usable"),
        ("setup flags in use", "|".join(f.setup_flag_names) or "(none)"),
        ("setup flags accepted", ", ".join(accepted)),
        ("operations", ", ".join(sorted(f.ops))),
        ("SEND_ZC", _yes(f.send_zc)),
        ("SEND_ZC fixed buffer", _yes(f.send_zc_fixed)),
        ("loopback zero copy", copied[f.zc_copied_on_loopback]),
        ("SENDMSG_ZC vectored fixed", _yes(f.sendmsg_zc_fixed_vectored)),
        ("SEND bundles", _yes(f.send_bundle)),
        ("multishot accept", _yes(f.accept_multishot)),
        ("multishot recv", _yes(f.recv_multishot)),
        ("fixed-provided SEND_ZC", f.fixed_provided_detail),
        ("fixed-provided addr split", f.fixed_provided_split or "none probed"),
        ("send strategy", f.strategy),
    ]
    lines += [f"{label + ':':<27}{value}" for label, value in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trio_uring",
        description="Probe the running kernel and report what trio_uring can use.",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    f = features()
    if args.json:
        json.dump(f.as_dict(), sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        print(render(f))
    return 0


if __name__ == "__main__":
    sys.exit(main())
