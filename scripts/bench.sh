#!/usr/bin/env bash
# scripts/bench.sh [--quick] [--no-build]: end-to-end ringlb vs HAProxy on loopback, in one run.
#
# Both load balancers sit in front of the same backends and are started fresh for every
# workload and repetition, alternating which goes first. Workloads:
#   bulk      iperf3 -P 1 and -P 8 through the LB: Gbit/s, and LB CPU seconds per GB moved
#   connrate  connect/64 B request/64 B reply/close from 64 threads: conn/s, p50/p99 latency,
#             LB CPU microseconds per connection
#   idle      N idle connections held through the LB: LB RSS growth in KiB per connection, and
#             whether all of them still echo afterwards
# Prints a markdown table of medians over repetitions and writes bench-results/latest.{md,csv}
# plus bench-results/raw-<timestamp>.csv (raw rows) and raw-<timestamp>-logs/ (process logs).
# A contestant whose binary is missing or fails to start gets "n/a" cells instead of aborting.
# Traffic goes only to 127.0.0.0/8; every load run is bounded in time and count.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: scripts/bench.sh [--quick] [--no-build]

  --quick      1 repetition, 3 s runs, 2,000 idle connections (under 3 minutes once built)
  default      3 repetitions, 10 s runs, 5,000 idle connections (about 10-15 minutes)
  --no-build   use the binaries already in target/release

Environment: RINGLB_BIN=path uses that ringlb binary instead of target/release/ringlb.
Needs root for apt-get (haproxy, iperf3, jq when missing) and the loopback sysctls;
without root those steps are skipped with a warning.
EOF
}

QUICK=0
BUILD=1
for arg in "$@"; do
    case "$arg" in
        --quick) QUICK=1 ;;
        --no-build) BUILD=0 ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
done

if ((QUICK)); then
    REPS=1 BULK_SECS=3 RATE_SECS=3 IDLE_CONNS=2000 MODE_NAME=quick
else
    REPS=3 BULK_SECS=10 RATE_SECS=10 IDLE_CONNS=5000 MODE_NAME=full
fi
RATE_CONCURRENCY=64
RATE_PAYLOAD=64
BACKEND_THREADS=2
LB_THREADS=2
CONTESTANTS=(ringlb haproxy)

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
# RINGLB_BIN points at another ringlb binary (e.g. an older build to compare against).
RINGLB="${RINGLB_BIN:-$ROOT/target/release/ringlb}"
CONNRATE="$ROOT/target/release/examples/connrate"
BACKEND="$ROOT/target/release/examples/bench_backend"
OUT_DIR="$ROOT/bench-results"
STAMP=$(date +%Y%m%d-%H%M%S)
RAW_CSV="$OUT_DIR/raw-$STAMP.csv"
LOGS="$OUT_DIR/raw-$STAMP-logs"
mkdir -p "$LOGS"

log() { printf '[bench %s] %s\n' "$(date +%T)" "$*" >&2; }
warn() { printf '[bench %s] WARNING: %s\n' "$(date +%T)" "$*" >&2; }
die() {
    printf '[bench %s] ERROR: %s\n' "$(date +%T)" "$*" >&2
    exit 1
}

# ---------------------------------------------------------------------------------------------
# Process bookkeeping: everything started in the background is tracked and killed on exit.

TRACKED=()
track() { TRACKED+=("$1"); }
untrack() {
    local keep=() p
    for p in "${TRACKED[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
    TRACKED=("${keep[@]}")
}

cleanup() {
    local rc=$? p
    set +e
    exec 7>&- 2>/dev/null
    if ((${#TRACKED[@]})); then
        for p in "${TRACKED[@]}"; do kill -TERM "$p" 2>/dev/null; done
        sleep 0.5
        for p in "${TRACKED[@]}"; do kill -KILL "$p" 2>/dev/null; done
        wait 2>/dev/null
    fi
    if ((rc != 0)); then
        log "stopped (status $rc); logs in ${LOGS#"$ROOT"/}"
    fi
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM

# Stops PID with SIGTERM, then SIGKILL after 5 s; its exit status goes to STOP_RC.
STOP_RC=0
stop_pid() {
    local pid=$1 i rc=0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        warn "pid $pid still running 5 s after SIGTERM; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || rc=$?
    untrack "$pid"
    STOP_RC=$rc
}

# run_bounded SECS OUTFILE ERRFILE CMD...: runs CMD in the background (so Ctrl-C is handled at
# once), killing it after SECS. Returns CMD's status.
run_bounded() {
    local limit=$1 out=$2 err=$3 pid rc=0
    shift 3
    "$@" >"$out" 2>>"$err" &
    pid=$!
    track "$pid"
    local deadline=$((SECONDS + limit))
    while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            warn "$1 ran past ${limit}s; killing it"
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.1
    done
    wait "$pid" || rc=$?
    untrack "$pid"
    return "$rc"
}

# ---------------------------------------------------------------------------------------------
# Setup: packages, kernel knobs, build.

is_root() { [[ $(id -u) -eq 0 ]]; }

install_deps() {
    local missing=() pkg
    command -v haproxy >/dev/null || missing+=(haproxy)
    command -v iperf3 >/dev/null || missing+=(iperf3)
    command -v jq >/dev/null || missing+=(jq)
    command -v ss >/dev/null || missing+=(iproute2)
    ((${#missing[@]})) || return 0
    is_root || die "missing ${missing[*]}; install them (apt-get install -y ${missing[*]}) or run as root"
    log "installing ${missing[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >"$LOGS/apt.log" 2>&1 || warn "apt-get update failed; see $LOGS/apt.log"
    apt-get install -y -qq "${missing[@]}" >>"$LOGS/apt.log" 2>&1 \
        || die "apt-get install ${missing[*]} failed; see $LOGS/apt.log"
    for pkg in haproxy iperf3 jq ss; do
        command -v "$pkg" >/dev/null || die "$pkg still missing after apt-get"
    done
}

# Sets a sysctl to VALUE unless it already is at least that (single integers only).
sysctl_at_least() {
    local key=$1 want=$2 have
    have=$(sysctl -n "$key" 2>/dev/null) || { warn "no sysctl $key"; return 0; }
    if ((have < want)); then
        sysctl -qw "$key=$want" 2>/dev/null || warn "could not set $key=$want (have $have)"
    fi
}

tune() {
    if is_root; then
        sysctl_at_least net.core.somaxconn 4096
        sysctl_at_least net.ipv4.tcp_max_syn_backlog 4096
        # 1 = reuse TIME_WAIT for outgoing connections everywhere; 2 (the default) = loopback
        # only, which already covers this script. Only 0 needs changing.
        if [[ $(sysctl -n net.ipv4.tcp_tw_reuse) == 0 ]]; then
            sysctl -qw net.ipv4.tcp_tw_reuse=1 || warn "could not enable net.ipv4.tcp_tw_reuse"
        fi
        local lo hi
        read -r lo hi < <(sysctl -n net.ipv4.ip_local_port_range)
        if ((lo > 10000 || hi < 65000)); then
            sysctl -qw net.ipv4.ip_local_port_range="$((lo < 10000 ? lo : 10000)) $((hi > 65000 ? hi : 65000))" \
                || warn "could not widen net.ipv4.ip_local_port_range"
        fi
        # Raise the hard fd limit where the container allows it (never lower it).
        if [[ $(ulimit -Hn) != unlimited ]] && (($(ulimit -Hn) < 65536)); then
            ulimit -Hn 65536 2>/dev/null || true
        fi
    else
        warn "not root: leaving sysctls and the hard fd limit as they are"
    fi
    ulimit -Sn "$(ulimit -Hn)" 2>/dev/null || true
    log "fd limit $(ulimit -n); somaxconn $(sysctl -n net.core.somaxconn);" \
        "tw_reuse $(sysctl -n net.ipv4.tcp_tw_reuse); ports $(sysctl -n net.ipv4.ip_local_port_range | tr '\t' ' ')"
}

build() {
    if ((BUILD)); then
        log "building: cargo build --release --examples --bin ringlb"
    else
        log "--no-build: using the binaries in target/release"
    fi
    if ((BUILD)) && ! cargo build --release --examples --bin ringlb >"$LOGS/build.log" 2>&1; then
        warn "cargo build failed (last lines below; full log in ${LOGS#"$ROOT"/}/build.log)"
        tail -n 15 "$LOGS/build.log" >&2
    fi
    [[ -x $CONNRATE && -x $BACKEND ]] \
        || die "examples connrate and bench_backend are not built; see ${LOGS#"$ROOT"/}/build.log"
    [[ -x $RINGLB ]] || warn "no ringlb binary: its cells will be n/a"
}

# ---------------------------------------------------------------------------------------------
# Ports, probes, /proc readings.

USED_PORTS=" "
listening() { [[ -n $(ss -Htln "sport = :$1" 2>/dev/null) ]]; }

# Sets PORT to a free port in 5000..9999 (below the ephemeral range), never handed out twice
# in one run. Not for $(...): the subshell would forget USED_PORTS.
PORT=0
free_port() {
    local p i
    for ((i = 0; i < 200; i++)); do
        p=$((5000 + RANDOM % 5000))
        [[ $USED_PORTS == *" $p "* ]] && continue
        listening "$p" && continue
        USED_PORTS+="$p "
        PORT=$p
        return 0
    done
    die "no free port found in 5000..9999"
}

# Waits until PID listens on PORT (seen with ss, so no probe connection disturbs a backend
# such as iperf3 that takes one client at a time). Fails if PID dies or SECS pass.
wait_listening() {
    local pid=$1 port=$2 secs=$3 i
    for ((i = 0; i < secs * 20; i++)); do
        kill -0 "$pid" 2>/dev/null || return 1
        listening "$port" && return 0
        sleep 0.05
    done
    return 1
}

CLK_TCK=$(getconf CLK_TCK)
# utime + stime of a process (all threads, io_uring workers included), in CLK_TCK ticks. With
# tick-based accounting this includes softirq work (loopback TCP delivery) that ran while the
# process was on the CPU; softirq work deferred to ksoftirqd is charged to ksoftirqd.
cpu_ticks() { sed 's/^.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'; }
ksoftirqd_ticks() {
    local p sum=0
    for p in $(pgrep '^ksoftirqd/'); do sum=$((sum + $(cpu_ticks "$p" 2>/dev/null || echo 0))); done
    echo "$sum"
}
# CPU of this script's reaped children (the load generators run by run_bounded), in ticks.
child_ticks() { sed 's/^.*) //' "/proc/$$/stat" | awk '{print $14 + $15}'; }
# Busy ticks of all cores.
machine_ticks() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 + $9; exit}' /proc/stat; }

# A measurement window around one load run: meas_begin LB_PID BACKEND_PID ... meas_end (same
# args). Sets LB_TICKS (the LB process), TOTAL_TICKS (LB + load generator + backend +
# ksoftirqd) and OTHER_PCT (CPU used meanwhile by everything else, in % of one core: the noise
# level; it also holds a little softirq work done while a core was idle).
meas_begin() {
    M_LB=$(cpu_ticks "$1") M_BE=$(cpu_ticks "$2") M_CH=$(child_ticks)
    M_SIRQ=$(ksoftirqd_ticks) M_BUSY=$(machine_ticks) M_T=$EPOCHREALTIME
}
meas_end() {
    local lb be ch sirq busy other
    lb=$(($(cpu_ticks "$1") - M_LB))
    be=$(($(cpu_ticks "$2") - M_BE))
    ch=$(($(child_ticks) - M_CH))
    sirq=$(($(ksoftirqd_ticks) - M_SIRQ))
    busy=$(($(machine_ticks) - M_BUSY))
    LB_TICKS=$lb
    TOTAL_TICKS=$((lb + be + ch + sirq))
    other=$((busy - TOTAL_TICKS))
    ((other > 0)) || other=0
    OTHER_PCT=$(awk "BEGIN { printf \"%.1f\", $other / $CLK_TCK / ($EPOCHREALTIME - $M_T) * 100 }")
    if awk "BEGIN { exit !($OTHER_PCT > 10) }"; then
        warn "other processes used ${OTHER_PCT}% of a core during this run: expect noise"
    fi
}
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
calc() { awk "BEGIN { printf \"%.6g\", $1 }"; }

# ---------------------------------------------------------------------------------------------
# Contestants: start_lb NAME BACKEND_ADDR TAG sets LB_PID and LB_PORT, or returns 1.

HAPROXY_MAXCONN=0

start_lb() {
    local name=$1 backend=$2 tag=$3 cfg err
    free_port
    LB_PORT=$PORT
    LB_PID=
    err="$LOGS/$tag.stderr"
    case "$name" in
        ringlb)
            [[ -x $RINGLB ]] || return 1
            cfg="$LOGS/$tag.toml"
            cat >"$cfg" <<EOF
[runtime]
workers = $LB_THREADS

[[listeners]]
name = "bench"
bind = "127.0.0.1:$LB_PORT"
balance = "round_robin"
connect_timeout = "3s"
idle_timeout = "1h"
backends = [ { address = "$backend" } ]
EOF
            "$RINGLB" run --config "$cfg" </dev/null >"$LOGS/$tag.stdout" 2>"$err" &
            ;;
        haproxy)
            cfg="$LOGS/$tag.cfg"
            cat >"$cfg" <<EOF
global
    nbthread $LB_THREADS
    maxconn $HAPROXY_MAXCONN

defaults
    mode tcp
    maxconn $HAPROXY_MAXCONN
    timeout connect 3s
    timeout client 1h
    timeout server 1h

listen bench
    bind 127.0.0.1:$LB_PORT
    server b1 $backend
EOF
            haproxy -db -f "$cfg" </dev/null >"$LOGS/$tag.stdout" 2>"$err" &
            ;;
        *) die "unknown contestant $name" ;;
    esac
    LB_PID=$!
    track "$LB_PID"
    if ! wait_listening "$LB_PID" "$LB_PORT" 15; then
        warn "$name did not start listening on 127.0.0.1:$LB_PORT; last lines of its stderr:"
        tail -n 5 "$err" | sed 's/^/    /' >&2
        stop_pid "$LB_PID"
        LB_PID=
        return 1
    fi
    if [[ $name == ringlb ]]; then
        # Listening comes first; "ready:" says every worker is serving.
        local i
        for ((i = 0; i < 100; i++)); do
            grep -q 'ready:' "$err" && break
            sleep 0.05
        done
        grep -q 'ready:' "$err" || warn "ringlb listens but logged no 'ready:' line after 5 s"
    fi
    return 0
}

stop_lb() {
    local name=$1 rc
    [[ -n $LB_PID ]] || return 0
    stop_pid "$LB_PID"
    rc=$STOP_RC
    # ringlb's contract is to drain and exit 0; haproxy -db dies of the signal (143) on a hard stop.
    if [[ $rc != 0 && ! ($name == haproxy && $rc == 143) ]]; then
        warn "$name exited with status $rc after SIGTERM"
    fi
    LB_PID=
}

# Contestant order for a repetition: alternate who goes first.
order() { if (($1 % 2)); then echo "${CONTESTANTS[1]} ${CONTESTANTS[0]}"; else echo "${CONTESTANTS[*]}"; fi; }

# ---------------------------------------------------------------------------------------------
# Results: one CSV row per measurement; "n/a" for a contestant that could not run.

echo "run,workload,metric,contestant,rep,value" >"$RAW_CSV"
METRICS=() # "workload|metric" in first-seen order
record() {
    local workload=$1 metric=$2 who=$3 rep=$4 value=$5 key="$1|$2" m
    for m in "${METRICS[@]}"; do [[ $m == "$key" ]] && key=; done
    [[ -z $key ]] || METRICS+=("$key")
    echo "$STAMP,$workload,$metric,$who,$rep,$value" >>"$RAW_CSV"
}
record_na() {
    local workload=$1 who=$2 rep=$3 metric
    shift 3
    for metric in "$@"; do record "$workload" "$metric" "$who" "$rep" n/a; done
}

# ---------------------------------------------------------------------------------------------
# Workloads.

BULK_METRICS=("P1 Gbit/s" "P1 CPU-s/GB" "P1 total CPU-s/GB" "P1 other load %"
    "P8 Gbit/s" "P8 CPU-s/GB" "P8 total CPU-s/GB" "P8 other load %")

workload_bulk() {
    local port pid rep who streams tag json gbps gb
    free_port
    port=$PORT
    iperf3 -s -B 127.0.0.1 -p "$port" </dev/null >"$LOGS/iperf3-server.log" 2>&1 &
    pid=$!
    track "$pid"
    wait_listening "$pid" "$port" 10 || die "iperf3 server did not start; see $LOGS/iperf3-server.log"
    for ((rep = 1; rep <= REPS; rep++)); do
        for who in $(order "$rep"); do
            tag="bulk-$who-$rep"
            if ! start_lb "$who" "127.0.0.1:$port" "$tag"; then
                record_na bulk "$who" "$rep" "${BULK_METRICS[@]}"
                continue
            fi
            for streams in 1 8; do
                json="$LOGS/$tag-P$streams.json"
                meas_begin "$LB_PID" "$pid"
                if run_bounded $((BULK_SECS + 30)) "$json" "$LOGS/$tag.client.stderr" \
                    iperf3 -c 127.0.0.1 -p "$LB_PORT" -t "$BULK_SECS" -P "$streams" -J \
                    && kill -0 "$LB_PID" 2>/dev/null \
                    && [[ $(jq -r '.error // empty' "$json") == "" ]]; then
                    meas_end "$LB_PID" "$pid"
                    gbps=$(jq '.end.sum_received.bits_per_second / 1e9' "$json")
                    gb=$(jq '.end.sum_received.bytes / 1e9' "$json")
                    record bulk "P$streams Gbit/s" "$who" "$rep" "$(calc "$gbps")"
                    record bulk "P$streams CPU-s/GB" "$who" "$rep" \
                        "$(calc "$LB_TICKS / $CLK_TCK / $gb")"
                    record bulk "P$streams total CPU-s/GB" "$who" "$rep" \
                        "$(calc "$TOTAL_TICKS / $CLK_TCK / $gb")"
                    record bulk "P$streams other load %" "$who" "$rep" "$OTHER_PCT"
                    log "bulk $who rep $rep -P $streams: $(calc "$gbps") Gbit/s, $(calc "$gb") GB," \
                        "LB $(calc "$LB_TICKS / $CLK_TCK") CPU-s, total $(calc "$TOTAL_TICKS / $CLK_TCK") CPU-s"
                else
                    warn "bulk $who rep $rep -P $streams failed: $(jq -r '.error // empty' "$json" 2>/dev/null)"
                    record_na bulk "$who" "$rep" "P$streams Gbit/s" "P$streams CPU-s/GB" \
                        "P$streams total CPU-s/GB" "P$streams other load %"
                fi
            done
            stop_lb "$who"
        done
    done
    stop_pid "$pid"
}

RATE_METRICS=("conn/s" "p50 µs" "p99 µs" "CPU µs/conn" "total CPU µs/conn" "errors" "other load %")

workload_connrate() {
    local port pid rep who tag json conns
    free_port
    port=$PORT
    "$BACKEND" --bind "127.0.0.1:$port" --threads "$BACKEND_THREADS" --mode reply \
        --payload "$RATE_PAYLOAD" </dev/null >/dev/null 2>"$LOGS/backend-reply.log" &
    pid=$!
    track "$pid"
    wait_listening "$pid" "$port" 10 || die "bench_backend (reply) did not start; see $LOGS/backend-reply.log"
    for ((rep = 1; rep <= REPS; rep++)); do
        for who in $(order "$rep"); do
            tag="connrate-$who-$rep"
            if ! start_lb "$who" "127.0.0.1:$port" "$tag"; then
                record_na connrate "$who" "$rep" "${RATE_METRICS[@]}"
                continue
            fi
            json="$LOGS/$tag.json"
            meas_begin "$LB_PID" "$pid"
            if run_bounded $((RATE_SECS + 30)) "$json" "$LOGS/$tag.client.stderr" \
                "$CONNRATE" --target "127.0.0.1:$LB_PORT" --mode rate \
                --concurrency "$RATE_CONCURRENCY" --duration-secs "$RATE_SECS" \
                --max-conns 5000000 --payload "$RATE_PAYLOAD" \
                && kill -0 "$LB_PID" 2>/dev/null && [[ $(jq '.conns' "$json") -gt 0 ]]; then
                meas_end "$LB_PID" "$pid"
                conns=$(jq '.conns' "$json")
                record connrate "conn/s" "$who" "$rep" "$(jq '.rate' "$json")"
                record connrate "p50 µs" "$who" "$rep" "$(jq '.p50_us' "$json")"
                record connrate "p99 µs" "$who" "$rep" "$(jq '.p99_us' "$json")"
                record connrate "CPU µs/conn" "$who" "$rep" \
                    "$(calc "$LB_TICKS / $CLK_TCK * 1e6 / $conns")"
                record connrate "total CPU µs/conn" "$who" "$rep" \
                    "$(calc "$TOTAL_TICKS / $CLK_TCK * 1e6 / $conns")"
                record connrate "errors" "$who" "$rep" "$(jq '.errors' "$json")"
                record connrate "other load %" "$who" "$rep" "$OTHER_PCT"
                log "connrate $who rep $rep: $(cat "$json")"
            else
                warn "connrate $who rep $rep failed; see ${LOGS#"$ROOT"/}/$tag.client.stderr"
                record_na connrate "$who" "$rep" "${RATE_METRICS[@]}"
            fi
            stop_lb "$who"
        done
    done
    stop_pid "$pid"
}

IDLE_METRICS=("KiB/idle conn" "RSS MiB held" "opened" "still echoing")

workload_idle() {
    local port pid rep who tag out fifo cpid rss0 rss1 opened still i ok
    free_port
    port=$PORT
    "$BACKEND" --bind "127.0.0.1:$port" --threads "$BACKEND_THREADS" --mode echo \
        </dev/null >/dev/null 2>"$LOGS/backend-echo.log" &
    pid=$!
    track "$pid"
    wait_listening "$pid" "$port" 10 || die "bench_backend (echo) did not start; see $LOGS/backend-echo.log"
    for ((rep = 1; rep <= REPS; rep++)); do
        for who in $(order "$rep"); do
            tag="idle-$who-$rep"
            if ! start_lb "$who" "127.0.0.1:$port" "$tag"; then
                record_na idle "$who" "$rep" "${IDLE_METRICS[@]}"
                continue
            fi
            sleep 0.5
            rss0=$(rss_kib "$LB_PID")
            out="$LOGS/$tag.jsonl"
            fifo="$LOGS/$tag.stdin"
            rm -f "$fifo"
            mkfifo "$fifo"
            exec 7<>"$fifo" # read-write: opening never blocks, and the reader sees no EOF
            "$CONNRATE" --target "127.0.0.1:$LB_PORT" --mode idle --max-conns "$IDLE_CONNS" \
                --duration-secs 120 <"$fifo" >"$out" 2>"$LOGS/$tag.client.stderr" &
            cpid=$!
            track "$cpid"
            ok=0
            for ((i = 0; i < 1500; i++)); do # opening has 150 s at most
                [[ -s $out ]] && { ok=1; break; }
                kill -0 "$cpid" 2>/dev/null || break
                sleep 0.1
            done
            opened=0
            if ((ok)) && kill -0 "$LB_PID" 2>/dev/null; then
                sleep 1 # let the LB settle any lazily allocated per-connection state
                rss1=$(rss_kib "$LB_PID")
                opened=$(head -n 1 "$out" | jq '.opened')
            fi
            echo go >&7
            for ((i = 0; i < 600; i++)); do # checking has 60 s at most
                kill -0 "$cpid" 2>/dev/null || break
                sleep 0.1
            done
            stop_pid "$cpid"
            exec 7>&-
            rm -f "$fifo"
            still=$(sed -n 2p "$out" | jq '.still_echoing' 2>/dev/null || true)
            if ((opened > 0)) && [[ -n $still ]]; then
                record idle "KiB/idle conn" "$who" "$rep" "$(calc "($rss1 - $rss0) / $opened")"
                record idle "RSS MiB held" "$who" "$rep" "$(calc "$rss1 / 1024")"
                record idle "opened" "$who" "$rep" "$opened"
                record idle "still echoing" "$who" "$rep" "$still"
                log "idle $who rep $rep: $opened opened of $IDLE_CONNS, RSS ${rss0} -> ${rss1} KiB, $still still echoing"
                ((still == IDLE_CONNS)) || warn "idle $who rep $rep: only $still of $IDLE_CONNS still echo"
            else
                warn "idle $who rep $rep failed; see ${LOGS#"$ROOT"/}/$tag.client.stderr"
                record_na idle "$who" "$rep" "${IDLE_METRICS[@]}"
            fi
            stop_lb "$who"
        done
    done
    stop_pid "$pid"
}

# ---------------------------------------------------------------------------------------------
# Report: medians over repetitions.

report() {
    local rev kernel cpu md="$OUT_DIR/latest.md"
    if rev=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null); then
        git -C "$ROOT" diff --quiet HEAD -- 2>/dev/null || rev+=" + local changes"
    else
        rev="(uncommitted tree)"
    fi
    kernel=$(uname -r)
    cpu=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)
    {
        echo "## ringlb vs HAProxy ($MODE_NAME run, $STAMP)"
        echo
        echo "ringlb $rev, $(haproxy -v | head -n 1 | awk '{print "HAProxy", $3}'), $(iperf3 --version | head -n 1 | awk '{print "iperf3", $2}');"
        echo "kernel $kernel, $(nproc) cores ($cpu); everything on loopback on the same cores."
        echo "Medians of $REPS repetition(s); both LBs with 2 threads, fresh per workload and repetition."
        echo "Higher is better for Gbit/s and conn/s; lower for CPU, latency, memory and errors."
        echo "CPU = the LB process's utime+stime (including the loopback TCP delivery its sends trigger)."
        echo "Total CPU = LB + load generator + backend + ksoftirqd."
        echo "Other load % = CPU used meanwhile by processes outside the benchmark, in % of one core: the"
        echo "noise level (no ratio)."
        echo
        echo "| workload | metric | ringlb | haproxy | ratio (ringlb/haproxy) |"
        echo "|---|---|---:|---:|---:|"
        local key
        for key in "${METRICS[@]}"; do
            awk -F, -v key="$key" '
                function median(list,    a, n, i, j, t) {
                    n = split(list, a, " ")
                    if (n == 0) return "n/a"
                    for (i = 2; i <= n; i++)
                        for (j = i; j > 1 && a[j - 1] + 0 > a[j] + 0; j--) { t = a[j]; a[j] = a[j - 1]; a[j - 1] = t }
                    return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
                }
                function fmt(v) {
                    if (v == "n/a") return v
                    v += 0
                    if (v == int(v) && (v >= 100 || v == 0)) return sprintf("%d", v)
                    if (v >= 100) return sprintf("%.0f", v)
                    if (v >= 10) return sprintf("%.1f", v)
                    return sprintf("%.3g", v)
                }
                NR > 1 && $2 "|" $3 == key && $6 != "n/a" { vals[$4] = vals[$4] " " $6 }
                END {
                    split(key, k, "|")
                    r = median(vals["ringlb"]); h = median(vals["haproxy"])
                    ratio = (r != "n/a" && h != "n/a" && h + 0 != 0) ? sprintf("%.2f", r / h) : "n/a"
                    if (k[2] ~ /other load/) ratio = "-"
                    printf "| %s | %s | %s | %s | %s |\n", k[1], k[2], fmt(r), fmt(h), ratio
                }' "$RAW_CSV"
        done
    } >"$md"
    cp "$RAW_CSV" "$OUT_DIR/latest.csv"
    echo
    cat "$md"
    echo
    log "wrote ${md#"$ROOT"/}, bench-results/latest.csv and ${RAW_CSV#"$ROOT"/}"
}

# Everything here shares 2 cores with whatever else runs: say so when the machine is busy.
check_quiet() {
    local m0 t0 m1 t1 busy
    m0=$(machine_ticks)
    t0=$(awk '/^cpu / {s = 0; for (i = 2; i <= NF; i++) s += $i; print s; exit}' /proc/stat)
    sleep 1
    m1=$(machine_ticks)
    t1=$(awk '/^cpu / {s = 0; for (i = 2; i <= NF; i++) s += $i; print s; exit}' /proc/stat)
    busy=$(((m1 - m0) * 100 / (t1 - t0 > 0 ? t1 - t0 : 1)))
    if ((busy > 10)); then
        warn "the machine is ${busy}% busy before the benchmark; numbers will be noisy:"
        ps -eo pcpu,comm --sort=-pcpu | sed -n '2,4p' | sed 's/^/    /' >&2
    fi
}

# ---------------------------------------------------------------------------------------------

main() {
    local started=$SECONDS
    log "$MODE_NAME run: $REPS repetition(s), bulk ${BULK_SECS}s, connrate ${RATE_SECS}s x $RATE_CONCURRENCY, idle $IDLE_CONNS conns"
    install_deps
    tune
    build
    # haproxy sizes its tables from maxconn and refuses to start past the fd limit.
    HAPROXY_MAXCONN=$((($(ulimit -n) - 200) / 2))
    ((HAPROXY_MAXCONN > 50000)) && HAPROXY_MAXCONN=50000
    ((HAPROXY_MAXCONN > IDLE_CONNS)) \
        || die "fd limit $(ulimit -n) is too low for $IDLE_CONNS idle connections through a proxy"
    check_quiet
    log "workload bulk"
    workload_bulk
    log "workload connrate"
    workload_connrate
    log "workload idle"
    workload_idle
    report
    log "done in $((SECONDS - started)) s"
}

main
