# scripts/bench/lib.sh: sourced by scripts/bench.sh. Logging, process bookkeeping, setup
# (packages, kernel knobs, build), ports, and /proc readings for the measurement windows.
# Expects ROOT, LOGS, BUILD and the binary paths to be set by the caller.

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

# Children of the tracked processes (nginx workers) are found before the parents go, so that
# a worker orphaned by a SIGKILLed master is not left behind.
cleanup() {
    local rc=$? p kids=()
    set +e
    exec 7>&- 2>/dev/null
    if ((${#TRACKED[@]})); then
        for p in "${TRACKED[@]}"; do mapfile -t -O "${#kids[@]}" kids < <(pgrep -P "$p" 2>/dev/null); done
        for p in "${TRACKED[@]}" "${kids[@]}"; do kill -TERM "$p" 2>/dev/null; done
        sleep 0.5
        for p in "${TRACKED[@]}" "${kids[@]}"; do kill -KILL "$p" 2>/dev/null; done
        wait 2>/dev/null
    fi
    if ((rc != 0)); then
        log "stopped (status $rc); logs in ${LOGS#"$ROOT"/}"
    fi
}

# Stops PID with SIGTERM, then SIGKILL after 5 s; its exit status goes to STOP_RC. Children it
# had (nginx workers) that outlive it are killed too.
STOP_RC=0
stop_pid() {
    local pid=$1 i rc=0 kids kid comm
    kids=$(ps -o pid=,comm= --ppid "$pid" 2>/dev/null || true)
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
    while read -r kid comm; do
        [[ -n $kid ]] || continue
        # Still there under the same name seconds later: an orphaned child, not a reused pid.
        if [[ $(ps -o comm= -p "$kid" 2>/dev/null) == "$comm" ]]; then
            warn "child $kid ($comm) of $pid outlived it; killing it"
            kill -KILL "$kid" 2>/dev/null || true
        fi
    done <<<"$kids"
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

# The stream module is a separate package in Debian 12: `nginx` alone (and nginx-light) has no
# `stream {}`; libnginx-mod-stream adds it as a dynamic module (loaded with load_module below).
NGINX_STREAM_MODULE=/usr/lib/nginx/modules/ngx_stream_module.so

install_deps() {
    local missing=() cmd
    command -v haproxy >/dev/null || missing+=(haproxy)
    command -v nginx >/dev/null || missing+=(nginx)
    [[ -f $NGINX_STREAM_MODULE ]] || missing+=(libnginx-mod-stream)
    command -v iperf3 >/dev/null || missing+=(iperf3)
    command -v wrk >/dev/null || missing+=(wrk)
    command -v jq >/dev/null || missing+=(jq)
    command -v ss >/dev/null || missing+=(iproute2)
    command -v gnuplot >/dev/null || missing+=(gnuplot-nox)
    ((${#missing[@]})) || return 0
    is_root || die "missing ${missing[*]}; install them (apt-get install -y ${missing[*]}) or run as root"
    log "installing ${missing[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >"$LOGS/apt.log" 2>&1 || warn "apt-get update failed; see $LOGS/apt.log"
    # The nginx package starts a system-wide nginx on port 80 unless policy-rc.d says no; the
    # benchmark runs its own private instances and never touches that one.
    apt-get install -y -qq "${missing[@]}" >>"$LOGS/apt.log" 2>&1 \
        || die "apt-get install ${missing[*]} failed; see $LOGS/apt.log"
    for cmd in haproxy nginx iperf3 wrk jq ss; do
        command -v "$cmd" >/dev/null || die "$cmd still missing after apt-get"
    done
    [[ -f $NGINX_STREAM_MODULE ]] || die "no $NGINX_STREAM_MODULE after installing libnginx-mod-stream"
    command -v gnuplot >/dev/null || warn "no gnuplot: no chart"
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
    [[ -x $CONNRATE && -x $BACKEND && -x $UDPLOAD ]] \
        || die "examples connrate, udp_load and bench_backend are not built; see ${LOGS#"$ROOT"/}/build.log"
    [[ -x $RINGLB ]] || warn "no ringlb binary: its cells will be n/a"
}

# ---------------------------------------------------------------------------------------------
# Ports, probes, /proc readings.

USED_PORTS=" "
# Is anything bound to PORT, TCP listening or UDP?
port_busy() { [[ -n $(ss -Htuln "sport = :$1" 2>/dev/null) ]]; }
listening() { [[ -n $(ss -Htln "sport = :$1" 2>/dev/null) ]]; }
udp_bound() { [[ -n $(ss -Huln "sport = :$1" 2>/dev/null) ]]; }

# Sets PORT to a free port in 5000..9999, never handed out twice in one run. Listener ports stay
# below 10000 because tune() widens the ephemeral range to 10000-65000: a listener inside that
# range could collide with an ephemeral port in use (EADDRINUSE). Not for $(...): the subshell
# would forget USED_PORTS.
PORT=0
free_port() {
    local p i
    for ((i = 0; i < 200; i++)); do
        p=$((5000 + RANDOM % 5000))
        [[ $USED_PORTS == *" $p "* ]] && continue
        port_busy "$p" && continue
        USED_PORTS+="$p "
        PORT=$p
        return 0
    done
    die "no free port found in 5000..9999"
}

# Waits until PID listens on PORT (tcp) or has bound it (udp), seen with ss, so no probe
# connection disturbs a backend such as iperf3 that takes one client at a time. Fails if PID
# dies or SECS pass.
wait_listening() {
    local pid=$1 port=$2 secs=$3 proto=${4:-tcp} i
    for ((i = 0; i < secs * 20; i++)); do
        kill -0 "$pid" 2>/dev/null || return 1
        if [[ $proto == udp ]]; then udp_bound "$port" && return 0; else listening "$port" && return 0; fi
        sleep 0.05
    done
    return 1
}

CLK_TCK=$(getconf CLK_TCK)
# utime + stime of a process (all threads, io_uring workers included), in CLK_TCK ticks. With
# tick-based accounting this includes softirq work (loopback delivery) that ran while the
# process was on the CPU; softirq work deferred to ksoftirqd is charged to ksoftirqd.
cpu_ticks() { sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | awk '{print $12 + $13}'; }
# The same, summed over PID and its children (nginx: master + workers). 0 for no PID.
tree_pids() {
    [[ -n $1 ]] || return 0
    echo "$1"
    pgrep -P "$1" 2>/dev/null || true
}
tree_ticks() {
    local p sum=0 t
    for p in $(tree_pids "$1"); do
        t=$(cpu_ticks "$p")
        sum=$((sum + ${t:-0}))
    done
    echo "$sum"
}
# A /proc/PID/status field (VmRSS, VmHWM) in KiB summed over PID and its children.
tree_status_kib() {
    local p sum=0 v
    for p in $(tree_pids "$1"); do
        v=$(awk -v f="$2:" '$1 == f {print $2}' "/proc/$p/status" 2>/dev/null)
        sum=$((sum + ${v:-0}))
    done
    echo "$sum"
}
ksoftirqd_ticks() {
    local p sum=0
    for p in $(pgrep '^ksoftirqd/'); do sum=$((sum + $(cpu_ticks "$p" || echo 0))); done
    echo "$sum"
}
# CPU of this script's reaped children (the load generators run by run_bounded), in ticks.
child_ticks() { sed 's/^.*) //' "/proc/$$/stat" | awk '{print $14 + $15}'; }
# Busy ticks of all cores.
machine_ticks() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 + $9; exit}' /proc/stat; }

# A measurement window around one load run: meas_begin LB_PID BACKEND_PID ... meas_end (same
# args; LB_PID may be empty for the no-proxy reference). Sets LB_TICKS (the LB's process tree),
# TOTAL_TICKS (LB + load generator + backend + ksoftirqd) and OTHER_PCT (CPU used meanwhile by
# everything else, in % of one core: the noise level; it also holds a little softirq work done
# while a core was idle).
meas_begin() {
    M_LB=$(tree_ticks "$1") M_BE=$(cpu_ticks "$2") M_CH=$(child_ticks)
    M_SIRQ=$(ksoftirqd_ticks) M_BUSY=$(machine_ticks) M_T=$EPOCHREALTIME
}
meas_end() {
    local lb be ch sirq busy other
    lb=$(($(tree_ticks "$1") - M_LB))
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
calc() { awk "BEGIN { printf \"%.6g\", $1 }"; }

# Busy % of all CPUs over SECS seconds.
busy_pct() {
    local m0 t0 m1 t1
    m0=$(machine_ticks)
    t0=$(awk '/^cpu / {s = 0; for (i = 2; i <= NF; i++) s += $i; print s; exit}' /proc/stat)
    sleep "$1"
    m1=$(machine_ticks)
    t1=$(awk '/^cpu / {s = 0; for (i = 2; i <= NF; i++) s += $i; print s; exit}' /proc/stat)
    echo $(((m1 - m0) * 100 / (t1 - t0 > 0 ? t1 - t0 : 1)))
}

# Everything here shares the CPUs with whatever else runs: wait up to WAIT_QUIET seconds for a
# quiet moment (under 10% busy for 5 s), and say so when the machine is busy anyway.
check_quiet() {
    local busy deadline=$((SECONDS + WAIT_QUIET))
    busy=$(busy_pct 1)
    if ((busy > 10 && WAIT_QUIET > 0)); then
        log "the machine is ${busy}% busy; waiting up to ${WAIT_QUIET}s for it to quieten"
        while ((SECONDS < deadline)); do
            busy=$(busy_pct 5)
            ((busy > 10)) || break
        done
    fi
    BUSY_AT_START=$busy
    if ((busy > 10)); then
        warn "the machine is ${busy}% busy before the benchmark; numbers will be noisy:"
        ps -eo pcpu,comm --sort=-pcpu | sed -n '2,4p' | sed 's/^/    /' >&2
    else
        log "the machine is ${busy}% busy: starting"
    fi
}
