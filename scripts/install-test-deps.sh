#!/usr/bin/env bash
# Installs the external programs the test suite drives: a real registry (docker-registry), real
# pull clients (skopeo, containerd/ctr), and the small tools the scripts use. Idempotent: a tool
# that is already on PATH is not reinstalled, and apt-get update runs at most once per call.
set -euo pipefail
# nginx and friends live in /usr/sbin, which a non-root PATH may lack.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

# command name -> Debian package that provides it
declare -A PKG_FOR_CMD=(
  [docker-registry]=docker-registry
  [skopeo]=skopeo
  [containerd]=containerd
  [ctr]=containerd
  [python3]=python3
  [curl]=curl
  [openssl]=openssl
  [nginx]=nginx-light
  [jq]=jq
  [hyperfine]=hyperfine
  # The partition test and the cluster benchmark: packet filters, namespaces, shaping.
  [iptables]=iptables
  [ip]=iproute2
  [tc]=iproute2
)

missing=()
for cmd in "${!PKG_FOR_CMD[@]}"; do
  if ! command -v "$cmd" >/dev/null 2>&1; then
    pkg=${PKG_FOR_CMD[$cmd]}
    [[ " ${missing[*]-} " == *" $pkg "* ]] || missing+=("$pkg")
  fi
done

if ((${#missing[@]} == 0)); then
  echo "install-test-deps: all test dependencies present"
  exit 0
fi

SUDO=()
if [[ $(id -u) -ne 0 ]]; then SUDO=(sudo); fi

echo "install-test-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"

# Nothing auto-starts without systemd, but a package's postinst may still try; the tests start
# private instances with their own configs, so a stray system daemon is only noise, not a problem.
for cmd in "${!PKG_FOR_CMD[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || { echo "install-test-deps: $cmd still missing" >&2; exit 1; }
done
echo "install-test-deps: done"
