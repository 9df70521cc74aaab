#!/usr/bin/env bash
# scripts/syscalls.sh: syscalls ringlb makes per keepalive request and per short connection,
# counted with `strace -f -c` on the running balancer (loopback only, bounded runs). Compares
# the I/O paths of one binary: io_uring, io_uring without ring recv/send (RINGLB_IO_DISABLE=
# ring_recv, the path before it) and epoll. strace slows the balancer down, so read the counts
# per unit of work, never the rates.
#
# usage: scripts/syscalls.sh [SECONDS]   (default 3; needs strace, wrk; builds release examples)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-3}
for cmd in strace wrk; do
    command -v "$cmd" >/dev/null || { echo "needs $cmd (apt-get install $cmd)" >&2; exit 2; }
done
cargo build --release --quiet --examples --bin ringlb
bin=target/release
tmp=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

http_port=$(free_port)
"$bin/examples/bench_backend" --bind "127.0.0.1:$http_port" --mode http >/dev/null 2>&1 &
pids+=($!)
echo_port=$(free_port)
"$bin/examples/bench_backend" --bind "127.0.0.1:$echo_port" --mode echo >/dev/null 2>&1 &
pids+=($!)
sleep 0.5

# run NAME ENV...: one ringlb with ENV, a keepalive run and a short-connection run under strace.
run() {
    local name=$1 lb_port rate_port cfg lb trace reqs conns
    shift
    lb_port=$(free_port)
    rate_port=$(free_port)
    cfg="$tmp/$name.toml"
    cat >"$cfg" <<EOF
[runtime]
workers = 2
[admin]
bind = "none"
[[listeners]]
name = "ka"
bind = "127.0.0.1:$lb_port"
backends = [{ address = "127.0.0.1:$http_port" }]
[[listeners]]
name = "rate"
bind = "127.0.0.1:$rate_port"
backends = [{ address = "127.0.0.1:$echo_port" }]
EOF
    env "$@" "$bin/ringlb" run --config "$cfg" 2>"$tmp/$name.log" &
    lb=$!
    for _ in $(seq 50); do grep -q 'ready:' "$tmp/$name.log" && break; sleep 0.1; done
    grep -q 'ready:' "$tmp/$name.log" || { echo "$name: ringlb did not start" >&2; tail "$tmp/$name.log" >&2; return 1; }

    trace="$tmp/$name-ka.strace"
    strace -f -c -o "$trace" -p "$lb" 2>/dev/null &
    local st=$!
    sleep 1
    reqs=$(wrk -t 2 -c 64 -d "${secs}s" "http://127.0.0.1:$lb_port/" | awk '/requests in/ {print $1}')
    kill -INT "$st"; wait "$st" 2>/dev/null || true
    report "$name" keepalive "$reqs" request "$trace"

    trace="$tmp/$name-rate.strace"
    strace -f -c -o "$trace" -p "$lb" 2>/dev/null &
    st=$!
    sleep 1
    conns=$("$bin/examples/connrate" --target "127.0.0.1:$rate_port" --duration-secs "$secs" \
        --concurrency 16 2>/dev/null | jq -r '.conns')
    kill -INT "$st"; wait "$st" 2>/dev/null || true
    report "$name" "short conn" "$conns" connection "$trace"
    kill "$lb"; wait "$lb" 2>/dev/null || true
}

# report NAME WORKLOAD UNITS UNIT TRACE: total syscalls and the top ones, per UNIT.
report() {
    local name=$1 workload=$2 units=$3 unit=$4 trace=$5
    if [[ -z $units || $units == 0 ]]; then
        echo "$name $workload: no $unit counted"
        return
    fi
    awk -v name="$name" -v w="$workload" -v n="$units" -v unit="$unit" '
        $1 ~ /^[0-9.]+$/ && NF >= 5 && $NF != "total" { calls[$NF] = $4; total += $4 }
        END {
            printf "%-22s %-11s %9d %ss  %6.2f syscalls/%s:", name, w, n, unit, total / n, unit
            PROCINFO["sorted_in"] = "@val_num_desc"
            k = 0
            for (s in calls) {
                if (calls[s] / n < 0.01) continue
                printf " %s %.2f", s, calls[s] / n
                if (++k == 8) break
            }
            printf "\n"
        }' "$trace"
}

run io_uring RINGLB_IO=io_uring
run io_uring-no-ring RINGLB_IO=io_uring RINGLB_IO_DISABLE=ring_recv
run epoll RINGLB_IO=epoll
