#!/usr/bin/env bash
# The test command: installs and starts what the tests need when it is
# missing, then runs the format check, clippy and every test.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt_update=1
apt_install() {
  if [ "$(id -u)" != 0 ]; then
    echo "missing $*: install it (as root: apt-get install -y $*)" >&2
    exit 1
  fi
  if [ "$need_apt_update" = 1 ]; then
    apt-get update -qq
    need_apt_update=0
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# Redis: the Redis store's contract suite and the two-process tests talk to a real server.
if ! command -v redis-server >/dev/null 2>&1; then
  apt_install redis-server
fi
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --logfile /tmp/switchboard-test-redis.log
  for _ in $(seq 1 50); do
    redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break
    sleep 0.1
  done
fi
# Chromium and Node.js: the web chat widget is tested in a real headless browser
# driven by playwright-core (pinned in tests/browser/package-lock.json).
if [ ! -x /usr/bin/chromium ]; then
  apt_install chromium
fi
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  apt_install nodejs npm
fi
# An emoji font, so that the inbox's screenshots show emoji as agents see them.
if [ ! -e /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ]; then
  apt_install fonts-noto-color-emoji
fi
npm ci --prefix tests/browser --no-audit --no-fund --loglevel=error

export SWITCHBOARD_TEST_REDIS_URL="${SWITCHBOARD_TEST_REDIS_URL:-redis://127.0.0.1:6379/0}"

# Email: Dovecot (IMAP) from Debian and an aiosmtpd SMTP server in a venv; the
# tests start their own instances on free ports.
bash scripts/email-servers.sh

cargo fmt --check
cargo clippy --all-targets -- -D warnings
cargo test --all-targets
cargo test --doc
