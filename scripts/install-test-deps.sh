#!/usr/bin/env bash
# Installs the external programs the test suite drives: a real registry (docker-registry), real
# pull clients (skopeo, containerd/ctr, dockerd), the small tools the scripts use, and a Python venv with
# the CRI client kubelet's pulls are tested with (PyPI container-runtime-interface-api), at
# $DAMSELFLY_TEST_VENV (default ~/.cache/damselfly/test-venv; the tests look there too),
# nydusd with nydus-image, PostgreSQL (the shared job store) and Chromium (the console).
# Idempotent: a tool that is already on PATH is not reinstalled, the venv is kept once it
# works, and apt-get update runs at most once per call.
set -euo pipefail
# nginx and friends live in /usr/sbin, which a non-root PATH may lack.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

# command name -> Debian package that provides it
declare -A PKG_FOR_CMD=(
  [docker-registry]=docker-registry
  [skopeo]=skopeo
  [containerd]=containerd
  [ctr]=containerd
  # dockerd pulling through the proxy (HTTPS_PROXY); the package also brings runc.
  [dockerd]=docker.io
  [docker]=docker.io
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
  # The console is checked in a headless browser.
  [chromium]=chromium
)

missing=()
for cmd in "${!PKG_FOR_CMD[@]}"; do
  if ! command -v "$cmd" >/dev/null 2>&1; then
    pkg=${PKG_FOR_CMD[$cmd]}
    [[ " ${missing[*]-} " == *" $pkg "* ]] || missing+=("$pkg")
  fi
done

# PostgreSQL's server binaries live off PATH, in /usr/lib/postgresql/<version>/bin; the tests
# find them there and run a private server as the postgres user.
if ! compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null; then
  missing+=(postgresql)
fi

SUDO=()
if [[ $(id -u) -ne 0 ]]; then SUDO=(sudo); fi
updated=0
apt_install() {
  if ((updated == 0)); then
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    updated=1
  fi
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

if ((${#missing[@]} == 0)); then
  echo "install-test-deps: all test programs present"
else
  echo "install-test-deps: installing ${missing[*]}"
  apt_install "${missing[@]}"
  # Nothing auto-starts without systemd, but a package's postinst may still try; the tests start
  # private instances with their own configs, so a stray system daemon is only noise.
  for cmd in "${!PKG_FOR_CMD[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || { echo "install-test-deps: $cmd still missing" >&2; exit 1; }
  done
  compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null || { echo "install-test-deps: postgres still missing" >&2; exit 1; }
fi

# The CRI client, pinned. Debian's python3 makes venvs only with python3-venv installed.
CRI_API_VERSION=2.0.1
venv=${DAMSELFLY_TEST_VENV:-$HOME/.cache/damselfly/test-venv}
if "$venv/bin/python" -c "import cri_api.images" >/dev/null 2>&1; then
  echo "install-test-deps: CRI client present in $venv"
else
  echo "install-test-deps: making $venv with container-runtime-interface-api $CRI_API_VERSION"
  rm -rf "$venv"
  if ! python3 -m venv "$venv" >/dev/null 2>&1; then
    rm -rf "$venv"
    apt_install python3-venv
    python3 -m venv "$venv"
  fi
  "$venv/bin/pip" install -q --disable-pip-version-check "container-runtime-interface-api==$CRI_API_VERSION"
  "$venv/bin/python" -c "import cri_api.images"
fi
# nydusd and nydus-image 2.2 (the last release with the registry backend's mirrors), built
# once into $DAMSELFLY_NYDUS_ROOT (default ~/.cache/damselfly/nydus; the tests look there too).
# About 4 minutes on 2 cores the first time.
NYDUS_VERSION=2.2.0
nydus_root=${DAMSELFLY_NYDUS_ROOT:-$HOME/.cache/damselfly/nydus}
# nydusd built from crates.io reports its version as "unknown"; cargo's own record says it.
if [[ -x $nydus_root/bin/nydusd ]] && cargo install --list --root "$nydus_root" | grep -q "^nydus-rs v$NYDUS_VERSION:"; then
  echo "install-test-deps: nydusd $NYDUS_VERSION present in $nydus_root"
else
  # cmake for libz-sys; pkg-config and the OpenSSL headers for the crates that may link it.
  build_deps=()
  command -v cmake >/dev/null 2>&1 || build_deps+=(cmake)
  command -v pkg-config >/dev/null 2>&1 || build_deps+=(pkg-config)
  dpkg -s libssl-dev >/dev/null 2>&1 || build_deps+=(libssl-dev)
  ((${#build_deps[@]} == 0)) || apt_install "${build_deps[@]}"
  echo "install-test-deps: building nydus-rs $NYDUS_VERSION into $nydus_root"
  cargo install nydus-rs --version "$NYDUS_VERSION" --locked --quiet --root "$nydus_root" \
    --target-dir "${TMPDIR:-/tmp}/damselfly-nydus-build"
  rm -rf "${TMPDIR:-/tmp}/damselfly-nydus-build"
fi
echo "install-test-deps: done"
