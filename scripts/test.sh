#!/usr/bin/env bash
# Install what the tests need into .venv (a virtual environment in the clone, so a PEP 668 "externally
# managed" system Python works too), plus Debian's chromium (browser tests) and iptables (NAT test); check lint, types and
# import contracts; and run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
as_root_apt() {
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 || return 1
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
if ! command -v chromium >/dev/null 2>&1; then
    as_root_apt chromium || echo "note: no chromium and no root apt-get: the browser tests will be skipped" >&2
fi
if ! command -v iptables >/dev/null 2>&1; then
    # The NAT test builds home routers with iptables MASQUERADE in network namespaces.
    as_root_apt iptables || echo "note: no iptables: the NAT relay test will be skipped" >&2
fi
if [ ! -x .venv/bin/python ]; then
    # Debian and Ubuntu ship venv separately (python3-venv).
    python3 -m venv .venv 2>/dev/null || { as_root_apt python3-venv && python3 -m venv .venv; }
fi
.venv/bin/python -m pip install -q -e '.[test]'
# Lint, types and import contracts (configured in pyproject.toml) come first: a finding fails the run before any
# test starts. SKIP_LINT=1 leaves them out of a local run; CI never sets it.
if [ "${SKIP_LINT:-0}" != 1 ]; then
    echo "== ruff"
    .venv/bin/ruff check --quiet .
    echo "== mypy"
    .venv/bin/mypy
    echo "== import contracts"
    .venv/bin/lint-imports --no-cache
fi
exec .venv/bin/python -m pytest "$@"
