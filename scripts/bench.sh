#!/usr/bin/env bash
# scripts/bench.sh [--quick] [--no-build]: end-to-end ringlb vs HAProxy vs NGINX on loopback,
# in one run.
#
# The load balancers (ringlb; HAProxy `mode tcp`; NGINX `stream`, each with 2 workers and
# logging off) sit in front of the same backends and are started fresh for every workload and
# repetition, rotating which goes first. Workloads:
#   bulk       iperf3 -P 1 and -P 8 through the LB: Gbit/s, and LB CPU seconds per GB moved
#   connrate   connect/64 B request/64 B reply/close from 64 threads: conn/s, p50/p99 latency,
#              LB CPU microseconds per connection
#   keepalive  wrk -t 2 -c 64 to a keep-alive HTTP responder: req/s, p50/p99, LB CPU µs/req
#   idle       N idle connections held through the LB: LB RSS growth in KiB per connection, and
#              whether all of them still echo afterwards
#   udp        64-byte request/response datagrams: replies/s, p50/p99, LB CPU µs/request;
#              ringlb vs NGINX (HAProxy has no UDP), plus the no-proxy path as a reference
# For each LB and workload it also records CPU seconds and peak RSS (VmHWM).
# Prints a markdown table of medians and ratios and writes bench-results/latest.{md,csv,json,png}
# plus bench-results/raw-<timestamp>.csv (raw rows) and raw-<timestamp>-logs/ (process logs,
# configs, client output). A contestant whose binary is missing or fails to start gets "n/a"
# cells instead of aborting. Traffic goes only to 127.0.0.0/8; every load run is bounded in time
# and count; every process the script starts is stopped when it exits.
#
# Layout: this file (options, settings, main) sources scripts/bench/{lib,contestants,workloads,
# report}.sh.
set -euo pipefail

usage() {
    cat <<'EOF_USAGE'
usage: scripts/bench.sh [--quick] [--no-build] [--only WORKLOAD,...] [--wait-quiet SECS]
       scripts/bench.sh --report-from STAMP

  --quick      1 repetition, 3 s runs, 2,000 idle connections (under 3 minutes once built)
  default      3 repetitions, 10 s runs, 8,000 idle connections (about 12 minutes)
  --no-build   use the binaries already in target/release
  --only LIST  run only these workloads (comma-separated: bulk,connrate,keepalive,idle,udp);
               latest.* then hold only those
  --wait-quiet SECS  before measuring, wait up to SECS for the machine to be under 10% busy
               (default 0: just warn when it is busy)
  --report-from STAMP  measure nothing: rewrite bench-results/latest.* from the raw results of
               an earlier run (bench-results/raw-STAMP.csv and raw-STAMP-logs/)

Environment: RINGLB_BIN=path uses that ringlb binary instead of target/release/ringlb.
Needs root for apt-get (haproxy, nginx + libnginx-mod-stream, iperf3, wrk, jq, gnuplot-nox when
missing) and the loopback sysctls; without root those steps are skipped with a warning.
EOF_USAGE
}

ALL_WORKLOADS=(bulk connrate keepalive idle udp)
QUICK=0
BUILD=1
WORKLOADS=("${ALL_WORKLOADS[@]}")
WAIT_QUIET=0
REPORT_FROM=
while (($#)); do
    case "$1" in
        --quick) QUICK=1 ;;
        --no-build) BUILD=0 ;;
        --only)
            (($# >= 2)) || { usage >&2; exit 2; }
            IFS=, read -r -a WORKLOADS <<<"$2"
            for w in "${WORKLOADS[@]}"; do
                [[ " ${ALL_WORKLOADS[*]} " == *" $w "* ]] || { echo "unknown workload: $w" >&2; exit 2; }
            done
            shift
            ;;
        --wait-quiet)
            [[ ${2:-} =~ ^[0-9]+$ ]] || { usage >&2; exit 2; }
            WAIT_QUIET=$2
            shift
            ;;
        --report-from)
            [[ ${2:-} =~ ^[0-9]{8}-[0-9]{6}$ ]] || { usage >&2; exit 2; }
            REPORT_FROM=$2
            shift
            ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
    shift
done

if ((QUICK)); then
    REPS=1 BULK_SECS=3 RATE_SECS=3 IDLE_CONNS=2000 MODE_NAME=quick
else
    REPS=3 BULK_SECS=10 RATE_SECS=10 IDLE_CONNS=8000 MODE_NAME=full
fi
LB_THREADS=2
BACKEND_THREADS=2
RATE_CONCURRENCY=64
RATE_PAYLOAD=64
KEEPALIVE_THREADS=2
KEEPALIVE_CONNS=64
UDP_SOCKETS=32
UDP_WINDOW=8
UDP_CLIENT_THREADS=2
CONTESTANTS=(ringlb ringlb-epoll haproxy nginx)

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
# RINGLB_BIN points at another ringlb binary (e.g. an older build to compare against).
RINGLB="${RINGLB_BIN:-$ROOT/target/release/ringlb}"
CONNRATE="$ROOT/target/release/examples/connrate"
UDPLOAD="$ROOT/target/release/examples/udp_load"
BACKEND="$ROOT/target/release/examples/bench_backend"
OUT_DIR="$ROOT/bench-results"
STAMP=${REPORT_FROM:-$(date +%Y%m%d-%H%M%S)}
RAW_CSV="$OUT_DIR/raw-$STAMP.csv"
LOGS="$OUT_DIR/raw-$STAMP-logs"
if [[ -n $REPORT_FROM ]]; then
    [[ -f $RAW_CSV && -f $LOGS/run.env ]] || { echo "no $RAW_CSV or $LOGS/run.env" >&2; exit 2; }
fi
mkdir -p "$LOGS"

# shellcheck source=scripts/bench/lib.sh
. "$ROOT/scripts/bench/lib.sh"
# shellcheck source=scripts/bench/contestants.sh
. "$ROOT/scripts/bench/contestants.sh"
# shellcheck source=scripts/bench/workloads.sh
. "$ROOT/scripts/bench/workloads.sh"
# shellcheck source=scripts/bench/report.sh
. "$ROOT/scripts/bench/report.sh"

trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM

main() {
    local started=$SECONDS
    if [[ -n $REPORT_FROM ]]; then
        load_run_info
        report
        return
    fi
    log "$MODE_NAME run: $REPS repetition(s), bulk ${BULK_SECS}s, connrate/keepalive/udp ${RATE_SECS}s," \
        "idle $IDLE_CONNS conns; contestants ${CONTESTANTS[*]}; workloads ${WORKLOADS[*]}"
    install_deps
    tune
    build
    # haproxy sizes its tables from maxconn and refuses to start past the fd limit.
    HAPROXY_MAXCONN=$((($(ulimit -n) - 200) / 2))
    ((HAPROXY_MAXCONN > 50000)) && HAPROXY_MAXCONN=50000
    ((HAPROXY_MAXCONN > IDLE_CONNS)) \
        || die "fd limit $(ulimit -n) is too low for $IDLE_CONNS idle connections through a proxy"
    init_results
    check_quiet
    save_run_info
    local w
    for w in "${WORKLOADS[@]}"; do
        log "workload $w"
        "workload_$w"
    done
    report
    log "done in $((SECONDS - started)) s"
}

main
