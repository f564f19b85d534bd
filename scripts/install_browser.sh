#!/usr/bin/env bash
# Headless Chromium and its WebDriver for the web demo's browser test (tests/projects/test_app_browser.py): Debian's
# packages chromium and chromium-driver (about 130 MB to download, 440 MB installed, under a minute), never a browser
# tool's own download. `make test-all` runs this first; with both already there it does nothing.
# Where they cannot be installed (not root, no apt-get, apt-get failing) it says why and exits 0: the browser test
# then skips, naming the missing file.
set -uo pipefail
BROWSER=/usr/bin/chromium
DRIVER=/usr/bin/chromedriver

if [ -x "$BROWSER" ] && [ -x "$DRIVER" ]; then
    echo "chromium: $("$BROWSER" --version 2>/dev/null || echo "$BROWSER")"
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "chromium: $BROWSER or $DRIVER missing, and installing Debian's chromium and chromium-driver needs root and" \
        "apt-get: the browser test will be skipped" >&2
    exit 0
fi
echo "chromium: installing Debian's chromium and chromium-driver"
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null; }
then
    echo "chromium: apt-get could not install chromium and chromium-driver (see above): the browser test will be" \
        "skipped" >&2
    exit 0
fi
echo "chromium: $("$BROWSER" --version)"
