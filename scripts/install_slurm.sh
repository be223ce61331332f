#!/usr/bin/env bash
# Install what tests/test_slurm.py needs on Debian/Ubuntu: Slurm's controller, node daemon
# and client commands (the test runs them as a private single-node cluster) and shellcheck.
# Idempotent: installs only what is missing. When it cannot (no apt-get, no root, no
# network) it says so and exits 0: the Slurm tests then skip, naming what is missing.
#   bash scripts/install_slurm.sh
set -euo pipefail

packages=(slurmctld slurmd slurm-client munge shellcheck)
missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$pkg")
done
if [[ ${#missing[@]} -eq 0 ]]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_slurm.sh: no apt-get; install ${missing[*]} by hand" >&2
    exit 0
fi
sudo=()
if [[ $(id -u) -ne 0 ]]; then
    if ! command -v sudo >/dev/null 2>&1; then
        echo "install_slurm.sh: not root and no sudo; install ${missing[*]} by hand" >&2
        exit 0
    fi
    sudo=(sudo)
fi
echo "installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# The packages' own services are not started here (no systemd); the test starts private ones.
if ! { "${sudo[@]}" apt-get update -qq &&
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }; then
    echo "install_slurm.sh: apt-get could not install ${missing[*]}; the Slurm tests will skip" >&2
fi
