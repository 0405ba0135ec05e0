#!/usr/bin/env bash
# Install Slurm (Debian's slurmctld, slurmd, slurm-client) and munge when they are missing and we are root, for
# the one-node test cluster (tests/slurm_cluster.py). The packages' own services are never used: the test
# fixture starts its own daemons from a temporary slurm.conf. Never fails the build: tests that need Slurm
# skip with a reason.
set -u
pkgs="slurmctld slurmd slurm-client munge"
if command -v slurmctld >/dev/null 2>&1 && command -v slurmd >/dev/null 2>&1 \
   && command -v sbatch >/dev/null 2>&1 && command -v munged >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Slurm for the test cluster (Debian packages $pkgs) ..."
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $pkgs; } \
    >/dev/null 2>&1 \
    || echo "could not install Slurm; run: apt-get update && apt-get install -y $pkgs (the Slurm tests skip)"
else
  echo "Slurm is missing; the Slurm tests skip. Install it with: sudo apt-get install -y $pkgs"
fi
