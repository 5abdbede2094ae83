#!/usr/bin/env bash
# Installs what the test suite needs from outside PyPI, idempotently:
# - the js-libp2p interop peer (npm, pinned in tests/interop/package-lock.json)
# - Debian's chromium for the dashboard browser test
# - Debian's postgresql for the tracker's shared store
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

if [ -f "$here/interop/package-lock.json" ]; then
  if [ ! -d "$here/interop/node_modules" ] || [ "$here/interop/package-lock.json" -nt "$here/interop/node_modules/.stamp" ]; then
    echo "setup-external: installing js-libp2p interop peer (npm ci)"
    (cd "$here/interop" && npm ci --no-audit --no-fund --loglevel=error && touch node_modules/.stamp)
  fi
fi

if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup-external: installing chromium (apt-get)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "setup-external: chromium not found and cannot apt-get install it; browser tests will fail" >&2
  fi
fi

# PostgreSQL for the tracker's shared store: the tests start a throwaway cluster from its binaries
# (/usr/lib/postgresql/<major>/bin); without them those tests fail and say so.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup-external: installing postgresql (apt-get)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  else
    echo "setup-external: PostgreSQL (initdb) not found and cannot apt-get install it; the tracker's PostgreSQL tests will fail" >&2
  fi
fi

# iproute2 and nftables: the NAT lab (tests/integration/natlab.py) builds network namespaces,
# veth pairs and masquerading NATs with them. Without them (or without root) that test fails
# and says why; it is never skipped.
if ! command -v ip >/dev/null 2>&1 || ! command -v nft >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup-external: installing iproute2 and nftables (apt-get)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 nftables >/dev/null
  else
    echo "setup-external: ip/nft not found and cannot apt-get install them; the NAT lab test will fail" >&2
  fi
fi
