#!/usr/bin/env bash
# Installs the real tools the deployment tests run: Debian's prometheus (with promtool) and nginx.
# Needs root (or passwordless sudo) and a Debian/Ubuntu apt. Without them the live tests skip
# locally, and fail under CI (CI=true), where the tools must be present.
set -euo pipefail

missing=()
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v prometheus >/dev/null 2>&1 || [[ " ${missing[*]-} " == *" prometheus "* ]] || missing+=(prometheus)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)  # renders the training report page
[ -e /usr/lib/x86_64-linux-gnu/libb64.so.0d ] || ldconfig -p 2>/dev/null | grep -q libb64.so.0d || missing+=(libb64-0d)  # perf_analyzer

if [ ${#missing[@]} -eq 0 ]; then
  echo "system tools present: $(command -v promtool) $(command -v nginx || echo /usr/sbin/nginx)"
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "warning: apt-get not found; cannot install ${missing[*]}; the live deployment tests will skip" >&2
  exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo="sudo -n"
  else
    echo "warning: not root; cannot install ${missing[*]}; the live deployment tests will skip" >&2
    exit 0
  fi
fi
echo "installing ${missing[*]} with apt-get"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
# --no-install-recommends keeps it small. A policy-rc.d that answers 101 stops the packages
# starting their daemons (the tests start their own); the host's own policy-rc.d, if any, is
# kept aside and put back afterwards, whatever happens.
policy=/usr/sbin/policy-rc.d
backup=""
if [ -e "$policy" ]; then
  backup=$(mktemp /tmp/policy-rc.d.XXXXXX)
  $sudo cp -p "$policy" "$backup"
fi
restore_policy() {
  if [ -n "$backup" ]; then $sudo mv -f "$backup" "$policy"; else $sudo rm -f "$policy"; fi
}
trap restore_policy EXIT
$sudo sh -c "printf '#!/bin/sh\\nexit 101\\n' > $policy && chmod +x $policy"
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "installed: $(command -v promtool) $(command -v nginx || echo /usr/sbin/nginx)"
