#!/usr/bin/env bash
# Installs SLURM (slurmctld, slurmd, sbatch, ...) and munge from the system's package manager for
# tests/unit/test_slurm_real.py, which starts the daemons itself on one host (Debian 12: 22.05).
# Idempotent and quick when installed already; prints one line and exits 1 on failure.
# Needs root (CI runs as root); a machine without apt-get or root skips the real-SLURM test.
set -uo pipefail
have() { command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
         && command -v sbatch >/dev/null && command -v munged >/dev/null; }
if have; then exit 0; fi
if [[ $(id -u) != 0 ]]; then
  echo "install_slurm: not root: slurm-wlm and munge not installed (the real-SLURM test skips)"
  exit 1
fi
if ! command -v apt-get >/dev/null; then
  echo "install_slurm: no apt-get: install slurm-wlm and munge by hand (the real-SLURM test skips)"
  exit 1
fi
log=$(mktemp)
export DEBIAN_FRONTEND=noninteractive
# policy-rc.d: the packages' postinst must not start the daemons (the test starts its own)
policy=/usr/sbin/policy-rc.d
made_policy=0
if [[ ! -e $policy ]]; then printf '#!/bin/sh\nexit 101\n' > $policy && chmod +x $policy \
  && made_policy=1; fi
ok=0
for attempt in 1 2; do
  if apt-get install -y -q --no-install-recommends slurm-wlm munge >>"$log" 2>&1; then
    ok=1; break
  fi
  (( attempt == 1 )) && apt-get update -q >>"$log" 2>&1
done
(( made_policy )) && rm -f $policy
if (( ok )) && have; then rm -f "$log"; exit 0; fi
echo "install_slurm: apt-get install slurm-wlm munge failed: $(tail -1 "$log") (log: $log)"
exit 1
