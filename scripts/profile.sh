#!/usr/bin/env bash
# scripts/profile.sh: where ringlb's CPU time goes under the keepalive and connection-rate loads
# of scripts/bench.sh (loopback only, bounded runs). `perf record -e cpu-clock -g` on the running
# balancer (software clock: works where the hardware counters are not exposed), then the share
# of samples in the kernel and in ringlb, and the top symbols of each.
#
# usage: scripts/profile.sh [SECONDS] [IO]   (default 5, io_uring; needs perf (linux-perf), wrk)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-5}
io=${2:-io_uring}
for cmd in perf wrk; do
    command -v "$cmd" >/dev/null || { echo "needs $cmd (apt-get install linux-perf wrk)" >&2; exit 2; }
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
ka_port=$(free_port)
rate_port=$(free_port)
cat >"$tmp/lb.toml" <<CFG
[runtime]
workers = 2
[admin]
bind = "none"
[[listeners]]
name = "ka"
bind = "127.0.0.1:$ka_port"
backends = [{ address = "127.0.0.1:$http_port" }]
[[listeners]]
name = "rate"
bind = "127.0.0.1:$rate_port"
backends = [{ address = "127.0.0.1:$echo_port" }]
CFG
RINGLB_IO=$io "$bin/ringlb" run --config "$tmp/lb.toml" 2>"$tmp/lb.log" &
lb=$!
pids+=("$lb")
for _ in $(seq 50); do grep -q 'ready:' "$tmp/lb.log" && break; sleep 0.1; done
grep -q 'ready:' "$tmp/lb.log" || { echo "ringlb did not start" >&2; tail "$tmp/lb.log" >&2; exit 1; }

# profile NAME COMMAND...: perf on the balancer while COMMAND runs, then the summary.
profile() {
    local name=$1 data="$tmp/$1.perf"
    shift
    perf record -q -e cpu-clock -g -p "$lb" -o "$data" -- sleep "$((secs + 1))" 2>/dev/null &
    local pr=$!
    sleep 0.5
    "$@" >/dev/null 2>&1 || true
    wait "$pr" || true
    local total kernel
    total=$(perf report -i "$data" --stdio --no-children --sort dso 2>/dev/null |
        awk '/^#/ {next} $1 ~ /%$/ {s += $1} END {print s + 0}')
    kernel=$(perf report -i "$data" --stdio --no-children --sort dso 2>/dev/null |
        awk '/^#/ {next} $2 == "[kernel.kallsyms]" {print $1 + 0}')
    echo "== $name ($io): ${kernel:-0}% of ringlb's samples in the kernel (of ${total}%)"
    echo "-- top kernel symbols"
    perf report -i "$data" --stdio --no-children --sort sym --dsos '[kernel.kallsyms]' 2>/dev/null |
        awk '/^#/ || NF == 0 {next} $1 ~ /%$/ {print "  " $0; if (++n == 12) exit}' || true
    echo "-- top ringlb symbols"
    perf report -i "$data" --stdio --no-children --sort sym --dsos ringlb 2>/dev/null |
        awk '/^#/ || NF == 0 {next} $1 ~ /%$/ {print "  " $0; if (++n == 8) exit}' || true
}

profile keepalive wrk -t 2 -c 64 -d "${secs}s" "http://127.0.0.1:$ka_port/"
profile connrate "$bin/examples/connrate" --target "127.0.0.1:$rate_port" \
    --duration-secs "$secs" --concurrency 64
