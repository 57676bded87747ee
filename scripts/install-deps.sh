#!/usr/bin/env bash
# Installs what Loden's demo and tests need on a fresh Debian 12 / Ubuntu machine (as root):
# Debian packages (only the missing ones, never recommends), then a venv with the package.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(etcd-server etcd-client iproute2 iptables nftables iputils-ping iperf3 tcpdump
  conntrack containernetworking-plugins wireguard-tools wireguard-go docker.io busybox-static
  openssl ethtool util-linux procps python3-venv make gcc libc6-dev graphviz)

PY=${PYTHON:-python3}
# The udp data path's C loops (src/loden/udp/_fastpath.c) need Python's headers; a
# pyenv/python.org build has them, Debian's python3 needs python3-dev.
if ! "$PY" -c 'import os, sysconfig, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' 2>/dev/null; then
  APT_PACKAGES+=(python3-dev)
fi

# kubectl for the API double's fidelity tests: Debian's kubernetes-client (1.20), unless a
# kubectl is already on PATH (here a `kubectl` package owns /usr/bin/kubectl and would
# conflict with it).
if ! command -v kubectl >/dev/null 2>&1; then
  APT_PACKAGES+=(kubernetes-client)
fi

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "install-deps: need root to install: ${missing[*]}" >&2
    exit 1
  fi
  echo "install-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.loden-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ] ||
  [ src/loden/udp/_fastpath.c -nt "$stamp" ]; then
  if ! .venv/bin/pip install -q -e '.[dev,pictures]' >.venv/pip.log 2>&1; then
    cat .venv/pip.log >&2
    echo "install-deps: pip install failed (log above)" >&2
    exit 1
  fi
  touch "$stamp"
fi
