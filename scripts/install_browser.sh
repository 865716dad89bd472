#!/usr/bin/env bash
# Install Debian's Chromium for the Tavern's browser tests (Playwright drives it via executable_path;
# no browser download). Skips quietly when Chromium is already there; says why when it cannot install.
set -uo pipefail
for b in /usr/bin/chromium /usr/bin/chromium-browser; do
  [ -x "$b" ] && exit 0
done
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
    && exit 0
elif command -v sudo >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  sudo apt-get update -qq >/dev/null && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
    >/dev/null && exit 0
fi
echo "warning: could not install Chromium (Debian package 'chromium'); browser tests will be skipped" >&2
exit 0
