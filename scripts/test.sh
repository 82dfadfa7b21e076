#!/usr/bin/env bash
# Install what the tests need (Python extras; Debian's chromium for the browser tests) and run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "note: no chromium and no root apt-get: the browser tests will be skipped" >&2
    fi
fi
python3 -m pip install -q -e '.[test]'
exec python3 -m pytest "$@"
