# Shared by dev/up, dev/down and dev/test. Logs go to stderr so that stdout stays `eval`-able.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# One cache for every checkout on this machine, so a CI clone reuses what dev/up already fetched.
CACHE="${OUTBOX_DEV_CACHE:-$HOME/.cache/outbox-dev}"
PG_VERSION=15
PG_CLUSTER=outbox
PG_PORT="${OUTBOX_DEV_PG_PORT:-55432}"
KAFKA_PORT="${OUTBOX_DEV_KAFKA_PORT:-19092}"
KAFKA_CONTROLLER_PORT="${OUTBOX_DEV_KAFKA_CONTROLLER_PORT:-19093}"
KAFKA_SASL_PORT="${OUTBOX_DEV_KAFKA_SASL_PORT:-19094}"
KAFKA_HOME="$CACHE/kafka"
# The SASL_SSL listener's CA and broker certificate, made by dev/up; its users' passwords are
# "$KAFKA_SASL_PREFIX<user>-secret" (dev only, and distinctive, so tests can grep for them).
KAFKA_TLS="$KAFKA_HOME/tls"
KAFKA_SASL_PREFIX="dev-only-"
DATABASE_URL="postgres://outbox:outbox@127.0.0.1:${PG_PORT}/outbox"
KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:${KAFKA_PORT}"
PGBOUNCER_PORT="${OUTBOX_DEV_PGBOUNCER_PORT:-56432}"
# Owned by postgres, which PgBouncer runs as (it refuses root).
PGBOUNCER_DIR="/var/lib/postgresql/outbox-dev-pgbouncer-${PGBOUNCER_PORT}"
PGBOUNCER_TRANSACTION_URL="postgres://outbox:outbox@127.0.0.1:${PGBOUNCER_PORT}/outbox_transaction"
PGBOUNCER_SESSION_URL="postgres://outbox:outbox@127.0.0.1:${PGBOUNCER_PORT}/outbox_session"

log() { echo "dev: $*" >&2; }
die() { echo "dev: error: $*" >&2; exit 1; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Kafka's tools, on the broker's own jars; given up after two minutes (a tool's admin client
# waits a minute per call for a broker that does not answer).
kafka_tool() {
  timeout 120 java -Xmx256m -Dlog4j2.configurationFile="$ROOT/dev/kafka/log4j2.yaml" \
    -cp "$KAFKA_HOME/libs/*" "$@"
}

# Waits until `$2...` succeeds, at most $1 seconds.
wait_for() {
  local seconds=$1; shift
  local deadline=$((SECONDS + seconds))
  until "$@"; do
    ((SECONDS < deadline)) || return 1
    sleep 0.2
  done
}
