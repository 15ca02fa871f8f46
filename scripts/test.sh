#!/usr/bin/env bash
# Set up everything the test suite needs on a fresh machine, then run it.
#
#   ./scripts/test.sh [PYTEST ARGS...]
#
# 1. System packages (Debian/Ubuntu, installed with apt-get when missing, as
#    root or through sudo; otherwise the script names them and stops):
#      gcc, python3-dev     build the C shim at install time
#      graphviz             the docs test renders diagrams with `dot`
#      socat, netcat-openbsd, curl, openssl
#                           the example tests talk to the examples with real clients
#      iproute2             the VM tier's NIC tests (network namespace, tap)
#      qemu-system-x86      the VM tier (optional: without it the tier is skipped)
#      wrk                  the load generator of bench scenario e (optional, as qemu)
#      valgrind             the instruction counts of python -m trio_uring.bench.callgrind
#                           (optional, as qemu: without it their tests are skipped)
# 2. This package with its test extras, in editable mode: into the active
#    virtualenv, or into the python3 found, or, where that python3 is the
#    distribution's externally managed one, into ./.venv.
# 3. pytest, with any arguments given.
#
# The VM tier boots seed kernels named by TRIO_URING_SEED_KERNEL and
# TRIO_URING_SEED_KERNEL_20_44 (see docs/kernel-support.rst); without them it
# is skipped with one line saying so.
set -euo pipefail
cd "$(dirname "$0")/.."

required=(gcc python3-dev python3-venv graphviz socat netcat-openbsd curl openssl iproute2)
optional=(qemu-system-x86 wrk valgrind)

have_command() { command -v "$1" > /dev/null 2>&1; }

installed() {
	if have_command dpkg-query; then
		dpkg-query -W -f='${Status}' "$1" 2> /dev/null | grep -q "install ok installed"
		return
	fi
	# No dpkg: judge by the commands each package provides.
	case "$1" in
	gcc) have_command cc ;;
	graphviz) have_command dot ;;
	netcat-openbsd) have_command nc ;;
	iproute2) have_command ip ;;
	qemu-system-x86) have_command qemu-system-x86_64 ;;
	wrk) have_command wrk ;;
	valgrind) have_command valgrind ;;
	python3-dev | python3-venv) true ;;
	*) have_command "$1" ;;
	esac
}

missing=()
for pkg in "${required[@]}" "${optional[@]}"; do
	installed "$pkg" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
	sudo=""
	[ "$(id -u)" = 0 ] || { have_command sudo && sudo="sudo"; }
	if have_command apt-get && { [ "$(id -u)" = 0 ] || [ -n "$sudo" ]; }; then
		echo "test.sh: installing ${missing[*]}" >&2
		$sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
		$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" > /dev/null
	else
		still=()
		for pkg in "${missing[@]}"; do
			[[ " ${optional[*]} " == *" $pkg "* ]] || still+=("$pkg")
		done
		echo "test.sh: missing system packages: ${missing[*]}" >&2
		echo "test.sh: install them with: sudo apt-get install ${missing[*]}" >&2
		[ ${#still[@]} -eq 0 ] || exit 1
		echo "test.sh: continuing; the tests that need them are skipped" >&2
	fi
fi

python=python3
if [ -z "${VIRTUAL_ENV:-}" ] && "$python" - << 'EOF'
import os, sys, sysconfig
sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")) else 1)
EOF
then
	# pip refuses to install into a distribution's own Python (PEP 668).
	[ -x .venv/bin/python ] || "$python" -m venv .venv
	python=.venv/bin/python
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
"$python" -m pip install -q -e '.[test]'
exec "$python" -m pytest "$@"
