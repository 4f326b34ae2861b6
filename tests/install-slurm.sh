#!/usr/bin/env bash
# What the SLURM tests need beyond pip: Debian's slurm-wlm and munge (tests/slurm_cluster.py starts a
# single-node cluster from them). Installs them as root when apt-get is there; otherwise says why the
# SLURM tests will skip (in CI, CI=true, they fail instead).
set -euo pipefail
if command -v slurmctld >/dev/null && command -v munged >/dev/null; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "install-slurm: not root or no apt-get: the SLURM tests will skip (apt-get install slurm-wlm munge)" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq slurm-wlm munge >/dev/null
echo "install-slurm: installed $(dpkg-query -W -f='${Package} ${Version}' slurm-wlm)"
