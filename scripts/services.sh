#!/usr/bin/env bash
# Make sure the Redis, PostgreSQL and RabbitMQ servers the tests use are installed and running
# on 127.0.0.1 (Redis 6379; PostgreSQL 5432, user postgres, trust on loopback; RabbitMQ 5672,
# guest/guest, which the RabbitMQ tests reach with rabbitmqctl as root). Assumes
# nothing an earlier run left behind; installs with apt-get when a server is missing.
set -euo pipefail

log() { printf '[services] %s\n' "$*" >&2; }
apt_updated=0
apt_install() {
  if [ "$apt_updated" = 0 ]; then apt-get update -qq; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
wait_until() {  # wait_until SECONDS WHAT COMMAND...
  local deadline=$((SECONDS + $1)) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then log "gave up waiting for $what"; return 1; fi
    sleep 0.2
  done
}

# Redis
command -v redis-server >/dev/null || { log "installing redis-server"; apt_install redis-server redis-tools; }
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  log "starting redis-server on 127.0.0.1:6379"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
fi
wait_until 30 redis redis-cli -h 127.0.0.1 -p 6379 ping

# PostgreSQL
if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
  log "installing postgresql"; apt_install postgresql
fi
version=$(ls /etc/postgresql | sort -V | tail -n 1)
if ! pg_isready -h 127.0.0.1 -p 5432 >/dev/null 2>&1; then
  log "starting PostgreSQL $version"
  pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
fi
wait_until 60 postgresql pg_isready -h 127.0.0.1 -p 5432
if ! psql -h 127.0.0.1 -U postgres -d postgres -Atc 'select 1' >/dev/null 2>&1; then
  log "allowing trust authentication on loopback for the test user"
  hba=$(su postgres -c "psql -Atc 'show hba_file'")
  sed -i '1i host all postgres 127.0.0.1/32 trust' "$hba"
  su postgres -c "psql -Atc 'select pg_reload_conf()'" >/dev/null
  wait_until 30 "postgres trust auth" psql -h 127.0.0.1 -U postgres -d postgres -Atc 'select 1'
fi
# RabbitMQ: the tests make a vhost of their own with rabbitmqctl and never restart it.
rabbitmq_answers() { timeout 60 rabbitmqctl -q await_startup && timeout 5 bash -c '</dev/tcp/127.0.0.1/5672'; }
command -v rabbitmq-server >/dev/null || { log "installing rabbitmq-server"; apt_install rabbitmq-server; }
if ! rabbitmq_answers >/dev/null 2>&1; then
  log "starting rabbitmq-server on 127.0.0.1:5672"
  mkdir -p /var/log/rabbitmq /var/lib/rabbitmq
  chown -R rabbitmq:rabbitmq /var/log/rabbitmq /var/lib/rabbitmq 2>/dev/null || true
  RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 runuser -u rabbitmq -- rabbitmq-server -detached 2>/dev/null \
    || RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 rabbitmq-server -detached
fi
if ! wait_until 120 rabbitmq rabbitmq_answers; then
  log "RabbitMQ cannot run here: its tests will skip, saying why"
fi
log "redis, postgresql and rabbitmq are up"
