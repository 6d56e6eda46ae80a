#!/usr/bin/env bash
# Make sure the servers hearth's tests and local runs use are up on loopback:
#   PostgreSQL 127.0.0.1:5432 (user postgres, trust), Redis 127.0.0.1:6379, Mosquitto 127.0.0.1:1883.
# Starts what is installed but stopped; installs (Debian/Ubuntu, apt-get) what is missing.
# Idempotent: does nothing when everything already answers.
set -euo pipefail

say() { printf 'services: %s\n' "$*" >&2; }
open_port() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() {
  for _ in $(seq 1 100); do open_port "$1" && return 0; sleep 0.1; done
  say "nothing answers on port $1 ($2)"; return 1
}
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
[ -x /usr/sbin/mosquitto ] || command -v mosquitto >/dev/null || missing+=(mosquitto)
command -v mosquitto_pub >/dev/null || missing+=(mosquitto-clients)
command -v psql >/dev/null || missing+=(postgresql-client)
ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || missing+=(postgresql)
command -v promtool >/dev/null || missing+=(prometheus)   # promtool, for the metrics and rules tests
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)   # schemathesis (scripts/apifuzz.sh)
command -v curl >/dev/null || missing+=(curl)
command -v chromium >/dev/null || missing+=(chromium)   # the dashboard's browser test
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
command -v runuser >/dev/null || missing+=(util-linux)   # the chaos tests run PostgreSQL as its user
command -v openssl >/dev/null || missing+=(openssl)   # the TLS tests make their certificates
command -v objcopy >/dev/null || missing+=(binutils)   # scripts/deb.sh strips the binaries
command -v systemd-analyze >/dev/null || missing+=(systemd)   # the package test verifies the unit
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
fi

if ! open_port 5432; then
  version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
  [ -n "$version" ] || { say "no PostgreSQL cluster in /etc/postgresql"; exit 1; }
  say "starting PostgreSQL $version"
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start
fi
wait_port 5432 PostgreSQL
if ! psql -h 127.0.0.1 -U postgres -d postgres -tAc 'select 1' >/dev/null 2>&1; then
  # A fresh Debian cluster asks for passwords over TCP; the tests connect as postgres without
  # one, on loopback only.
  hba=$(ls /etc/postgresql/*/main/pg_hba.conf | sort -V | tail -n 1)
  say "allowing trust auth on loopback in $hba"
  as_root sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
  as_root pg_ctlcluster --skip-systemctl-redirect "$(basename "$(dirname "$(dirname "$hba")")")" main reload
  sleep 1
  psql -h 127.0.0.1 -U postgres -d postgres -tAc 'select 1' >/dev/null
fi

if ! open_port 6379; then
  say "starting Redis"
  as_root mkdir -p /var/lib/redis /var/log/redis
  as_root redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
    --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
fi
wait_port 6379 Redis

if ! open_port 1883; then
  say "starting Mosquitto"
  mosquitto=$(command -v mosquitto || echo /usr/sbin/mosquitto)
  if [ -f /etc/mosquitto/mosquitto.conf ]; then
    as_root "$mosquitto" -d -c /etc/mosquitto/mosquitto.conf
  else
    as_root "$mosquitto" -d
  fi
fi
wait_port 1883 Mosquitto
say "PostgreSQL, Redis and Mosquitto are up"
