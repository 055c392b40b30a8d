#!/usr/bin/env bash
# Installs the Debian packages the tests, benchmarks and demo use, only those missing.
# Real, unmodified peers: iperf3, nginx, redis, wrk, curl, haproxy and socat as baselines.
set -euo pipefail

declare -A PACKAGE_FOR_COMMAND=(
  [ip]=iproute2 [nft]=nftables [tc]=iproute2 [haproxy]=haproxy [iperf3]=iperf3 [socat]=socat
  [nginx]=nginx-light [redis-server]=redis-server [redis-benchmark]=redis-tools [wrk]=wrk
  [curl]=curl [ethtool]=ethtool [nstat]=iproute2 [gcc]=gcc [ss]=iproute2
  [systemd-analyze]=systemd
)
missing=()
for cmd in "${!PACKAGE_FOR_COMMAND[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${PACKAGE_FOR_COMMAND[$cmd]}")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: missing Debian packages (${missing[*]}); run as root to install them" >&2
  exit 0
fi
mapfile -t unique < <(printf '%s\n' "${missing[@]}" | sort -u)
echo "install-deps: installing ${unique[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# policy-rc.d keeps the packaged services (nginx, redis) from being started by the install.
printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
apt-get install -y -qq --no-install-recommends "${unique[@]}" >/dev/null
rm -f /usr/sbin/policy-rc.d
