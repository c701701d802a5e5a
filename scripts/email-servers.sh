#!/usr/bin/env bash
# Installs the mail servers the email tests start themselves (never the
# system services): Dovecot's IMAP server from Debian (the tests give it its
# own configuration, users and mail in a tempdir, on a free port), the
# openssl command (a test CA and certificate for IMAP over TLS), and Python's
# aiosmtpd in a virtual environment at target/email-venv
# (SWITCHBOARD_TEST_SMTP_PYTHON names its interpreter). Idempotent: installs
# only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v dovecot >/dev/null 2>&1 && [ ! -x /usr/sbin/dovecot ]; then
  sudo_ apt-get update
  # Installing must not start or enable the system service.
  echo exit 101 | sudo_ tee /usr/sbin/policy-rc.d >/dev/null
  sudo_ chmod +x /usr/sbin/policy-rc.d
  DEBIAN_FRONTEND=noninteractive sudo_ apt-get install -y --no-install-recommends dovecot-imapd
  sudo_ rm -f /usr/sbin/policy-rc.d
fi

if ! command -v openssl >/dev/null 2>&1; then
  sudo_ apt-get update
  DEBIAN_FRONTEND=noninteractive sudo_ apt-get install -y --no-install-recommends openssl
fi

venv=target/email-venv
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import aiosmtpd' 2>/dev/null; then
  if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    sudo_ apt-get update
    DEBIAN_FRONTEND=noninteractive sudo_ apt-get install -y --no-install-recommends python3-venv
  fi
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet 'aiosmtpd>=1.4,<2'
fi
echo "email servers ready: $(command -v dovecot || echo /usr/sbin/dovecot), $venv/bin/python (aiosmtpd)"
