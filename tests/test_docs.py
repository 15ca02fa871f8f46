"""Build the documentation as CI does and check that what it says is true.

* ``sphinx-build -W -b html`` passes, the send-path diagram is rendered, and
  every public name has an entry in the API reference;
* ``sphinx-build -W -b doctest`` runs every ``testcode``/``doctest`` block;
* every error message quoted in an ``error-message`` block can be produced by
  a message string in the library's source;
* the kernel-support page explains every line ``python -m trio_uring`` prints.
"""

from __future__ import annotations

import ast
import html as html_module
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import trio_uring

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SOURCE = ROOT / "trio_uring"
BUILD_TIMEOUT = 240


def sphinx(builder: str, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", builder,
         "-d", str(out / ".doctrees"), str(DOCS), str(out)],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        cwd=ROOT,
    )  # fmt: skip


@pytest.fixture(scope="module")
def html(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("dot") is None:
        pytest.fail("graphviz's dot is not installed; scripts/test.sh installs it with apt-get")
    out = tmp_path_factory.mktemp("html")
    done = sphinx("html", out)
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def test_html_builds_with_warnings_as_errors(html: Path) -> None:
    for page in ("index", "tutorial", "how-it-works", "kernel-support", "tuning", "api", "faq",
                 "performance", "zero-copy-pays"):  # fmt: skip
        assert (html / f"{page}.html").is_file(), page


def test_send_path_diagram_is_rendered(html: Path) -> None:
    page = (html / "how-it-works.html").read_text()
    images = re.findall(r'(?:src|data)="(_images/graphviz-[0-9a-f]+\.svg)"', page)
    assert images, "no graphviz image on how-it-works.html"
    svg = html_module.unescape((html / images[0]).read_text())  # dot writes "-" as &#45;
    for label in ("outbound queue", "end of the scheduler tick", "notification CQE"):
        assert label in svg


def test_every_public_name_is_in_the_api_reference(html: Path) -> None:
    page = (html / "api.html").read_text()
    missing = [name for name in trio_uring.__all__ if f'id="trio_uring.{name}"' not in page]
    assert not missing, f"not documented in docs/api.rst: {missing}"


def test_code_blocks_run(tmp_path: Path) -> None:
    done = sphinx("doctest", tmp_path)
    report = (tmp_path / "output.txt").read_text() if (tmp_path / "output.txt").exists() else ""
    assert done.returncode == 0, report + done.stdout + done.stderr
    ran = re.search(r"^\s*(\d+) tests$", report, re.M)
    assert ran and int(ran.group(1)) >= 20, report
    assert re.search(r"^\s*0 failures in tests$", report, re.M), report


# -- quoted error messages -----------------------------------------------------------


def message_patterns() -> list[re.Pattern[str]]:
    """A regex per string literal and f-string in the library's source."""
    patterns = []
    for path in SOURCE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.JoinedStr):
                parts = [
                    re.escape(v.value) if isinstance(v, ast.Constant) else ".+?"
                    for v in node.values
                ]
                regex = "".join(parts)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                regex = re.escape(node.value)
            elif (
                isinstance(node, ast.BinOp)
                and isinstance(node.op, ast.Add)
                and isinstance(node.left, ast.Constant)
                and isinstance(node.left.value, str)
            ):
                regex = re.escape(node.left.value) + ".+?"  # "prefix " + what
            else:
                continue
            if len(re.sub(r"\.\+\?|\\", "", regex)) >= 8:
                patterns.append(re.compile(regex, re.S))
    return patterns


def quoted_messages() -> list[tuple[str, str]]:
    """(page, line) for each line of every ``:class: error-message`` block."""
    out = []
    block = re.compile(
        r"^\.\. code-block:: text\n   :class: error-message\n\n((?:   .*\n|\n)+)", re.M
    )
    for page in sorted(DOCS.glob("*.rst")):
        for match in block.finditer(page.read_text()):
            for line in match.group(1).splitlines():
                if line.strip():
                    out.append((page.name, line.strip()))
    return out


def test_quoted_error_messages_match_the_source() -> None:
    messages = quoted_messages()
    assert len(messages) >= 15, messages
    patterns = message_patterns()
    # Messages composed of two parts (a prefix and an OSError's strerror, or
    # the probe's reason inside a sentence) match a prefix pattern.
    unmatched = [
        (page, msg)
        for page, msg in messages
        if not any(p.fullmatch(msg) or (p.pattern.endswith(".+?") and p.match(msg))
                   for p in patterns)
    ]  # fmt: skip
    assert not unmatched, "docs quote messages the library does not print: " + repr(unmatched)


def test_kernel_support_explains_every_report_line() -> None:
    page = (DOCS / "kernel-support.rst").read_text()
    report = subprocess.run(
        [sys.executable, "-m", "trio_uring"], capture_output=True, text=True, timeout=60
    ).stdout
    labels = re.findall(r"^(\w[\w \-]*?):\s{2,}", report, re.M)
    assert "send strategy" in labels, report
    missing = [label for label in labels if f"``{label}``" not in page]
    assert not missing, f"docs/kernel-support.rst does not explain: {missing}"


def test_readme_test_command_is_what_ci_runs() -> None:
    """A new user runs what CI runs: the README's test command does the whole
    set-up (system packages included), and ``.ci/run`` calls exactly it."""
    readme = (ROOT / "README.md").read_text()
    after = readme.split("Run the tests", 1)[1]
    command = re.search(r"^    (\S.*)$", after, re.M)
    assert command, "no indented command under 'Run the tests'"
    ci_lines = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert ci_lines[-1] == command.group(1)
    script = ROOT / command.group(1).removeprefix("./")
    text = script.read_text()
    for package in ("graphviz", "socat", "netcat-openbsd", "curl", "openssl", "qemu-system-x86"):
        assert package in text, package
    assert "pip install" in text and "-m pytest" in text
