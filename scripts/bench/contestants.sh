# scripts/bench/contestants.sh: sourced by scripts/bench.sh. Starts and stops the contestants
# (ringlb on io_uring, ringlb-epoll: the same binary with RINGLB_IO=epoll, HAProxy `mode tcp`,
# NGINX stream), each with LB_THREADS workers and logging off, and
# records each one's CPU seconds and peak RSS per workload and repetition.
#
# start_lb NAME BACKEND_ADDR TAG [tcp|udp] sets LB_PID (the process to measure: for NGINX the
# master, whose children are the workers) and LB_PORT, or returns 1. NAME "direct" is the
# no-proxy reference: no process, LB_PORT is the backend's port.

HAPROXY_MAXCONN=0
NGINX_WORKER_CONNECTIONS=20000

start_lb() {
    local name=$1 backend=$2 tag=$3 proto=${4:-tcp} cfg err dir i
    LB_PID=
    if [[ $name == direct ]]; then
        LB_PORT=${backend##*:}
        return 0
    fi
    free_port
    LB_PORT=$PORT
    err="$LOGS/$tag.stderr"
    case "$name" in
        ringlb | ringlb-epoll)
            [[ -x $RINGLB ]] || return 1
            cfg="$LOGS/$tag.toml"
            {
                cat <<EOF
[runtime]
workers = $LB_THREADS
drain_timeout = "1s"

[admin]
bind = "127.0.0.1:0"

[[listeners]]
name = "bench"
bind = "127.0.0.1:$LB_PORT"
balance = "round_robin"
EOF
                if [[ $proto == udp ]]; then
                    printf 'protocol = "udp"\nidle_timeout = "30s"\nmax_flows = 65536\n'
                else
                    printf 'connect_timeout = "3s"\nidle_timeout = "1h"\n'
                fi
                echo "backends = [ { address = \"$backend\" } ]"
            } >"$cfg"
            # Each contestant forces its backend: `auto` would pick io_uring here anyway, but a
            # host where it cannot must not silently bench epoll twice.
            local io=io_uring
            [[ $name == ringlb-epoll ]] && io=epoll
            RINGLB_IO=$io "$RINGLB" run --config "$cfg" </dev/null >"$LOGS/$tag.stdout" 2>"$err" &
            ;;
        haproxy)
            [[ $proto == tcp ]] || return 1 # HAProxy proxies no UDP
            cfg="$LOGS/$tag.cfg"
            # No `log` line anywhere: HAProxy logs nothing.
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
        nginx)
            # A private prefix per run: its own pid file, error log and no system config.
            # `reuseport` gives each worker its own socket, as ringlb has; for UDP it is what
            # NGINX needs to keep a client's datagrams in one session (without it, measured
            # here: ~40% fewer datagrams/s and lost replies).
            dir="$LOGS/$tag-nginx"
            mkdir -p "$dir"
            cfg="$dir/nginx.conf"
            local listen_opts="reuseport" proxy_opts="proxy_connect_timeout 3s; proxy_timeout 1h;"
            if [[ $proto == udp ]]; then
                listen_opts="udp reuseport"
                proxy_opts="proxy_responses 1; proxy_timeout 30s;"
            fi
            cat >"$cfg" <<EOF
load_module $NGINX_STREAM_MODULE;
worker_processes $LB_THREADS;
pid $dir/nginx.pid;
error_log $dir/error.log crit;
events { worker_connections $NGINX_WORKER_CONNECTIONS; }
stream {
    access_log off;
    upstream bench { server $backend; }
    server {
        listen 127.0.0.1:$LB_PORT $listen_opts;
        proxy_pass bench;
        $proxy_opts
    }
}
EOF
            nginx -p "$dir/" -c "$cfg" -e "$dir/error.log" -g 'daemon off;' \
                </dev/null >"$LOGS/$tag.stdout" 2>"$err" &
            ;;
        *) die "unknown contestant $name" ;;
    esac
    LB_PID=$!
    track "$LB_PID"
    if ! wait_listening "$LB_PID" "$LB_PORT" 15 "$proto"; then
        warn "$name did not start listening on 127.0.0.1:$LB_PORT ($proto); last lines of its stderr:"
        tail -n 5 "$err" | sed 's/^/    /' >&2
        [[ -n ${dir:-} ]] && tail -n 5 "$dir/error.log" 2>/dev/null | sed 's/^/    /' >&2
        stop_pid "$LB_PID"
        LB_PID=
        return 1
    fi
    case "$name" in
        ringlb | ringlb-epoll)
            # Listening comes first; "ready:" says every worker is serving.
            for ((i = 0; i < 100; i++)); do
                grep -q 'ready:' "$err" && break
                sleep 0.05
            done
            grep -q 'ready:' "$err" || warn "ringlb listens but logged no 'ready:' line after 5 s"
            ;;
        nginx)
            # The master binds, then forks the workers.
            for ((i = 0; i < 100; i++)); do
                (($(pgrep -c -P "$LB_PID" || true) >= LB_THREADS)) && break
                sleep 0.05
            done
            (($(pgrep -c -P "$LB_PID" || true) >= LB_THREADS)) \
                || warn "nginx has fewer than $LB_THREADS workers after 5 s"
            ;;
    esac
    return 0
}

# stop_lb NAME WORKLOAD REP: records the LB's CPU seconds (whole life: start-up, every load run
# of this workload and repetition) and peak RSS (VmHWM, summed over NGINX's master and
# workers), then stops it.
stop_lb() {
    local name=$1 workload=$2 rep=$3 rc ticks hwm
    [[ -n $LB_PID ]] || return 0
    ticks=$(tree_ticks "$LB_PID")
    hwm=$(tree_status_kib "$LB_PID" VmHWM)
    record "$workload" "LB CPU-s" "$name" "$rep" "$(calc "$ticks / $CLK_TCK")"
    record "$workload" "LB peak RSS MiB" "$name" "$rep" "$(calc "$hwm / 1024")"
    stop_pid "$LB_PID"
    rc=$STOP_RC
    # ringlb drains and exits 0, NGINX's master exits 0 on SIGTERM; haproxy -db dies of the
    # signal (143).
    if [[ $rc != 0 && ! ($name == haproxy && $rc == 143) ]]; then
        warn "$name exited with status $rc after SIGTERM"
    fi
    LB_PID=
}

# order REP NAME...: the names rotated by REP-1, so each goes first in turn over repetitions.
order() {
    local rep=$1 n i
    shift
    n=$#
    local names=("$@")
    for ((i = 0; i < n; i++)); do printf '%s ' "${names[$(((i + rep - 1) % n))]}"; done
}
