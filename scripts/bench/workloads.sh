# scripts/bench/workloads.sh: sourced by scripts/bench.sh. The five workloads. Each starts its
# backend once, then for every repetition starts each contestant fresh (rotating who goes
# first), runs one bounded load, records the results and stops the contestant.

# bench_backend KIND PROTO ARGS...: starts bench_backend on a free port; sets BE_PID, BE_ADDR.
bench_backend() {
    local kind=$1 proto=$2
    shift 2
    free_port
    BE_ADDR="127.0.0.1:$PORT"
    "$BACKEND" --bind "$BE_ADDR" --threads "$BACKEND_THREADS" "$@" \
        </dev/null >/dev/null 2>"$LOGS/backend-$kind.log" &
    BE_PID=$!
    track "$BE_PID"
    wait_listening "$BE_PID" "$PORT" 10 "$proto" \
        || die "bench_backend ($kind) did not start; see ${LOGS#"$ROOT"/}/backend-$kind.log"
}

# each_rep WORKLOAD PROTO FN METRICS_VAR CONTESTANT...: for every repetition and contestant,
# start_lb in front of BE_ADDR, then FN WHO REP TAG (which records its metrics, or n/a), then
# stop_lb. A contestant that cannot start gets n/a for every metric.
each_rep() {
    local workload=$1 proto=$2 fn=$3 rep who tag
    local -n metric_list=$4
    shift 4
    for ((rep = 1; rep <= REPS; rep++)); do
        for who in $(order "$rep" "$@"); do
            tag="$workload-$who-$rep"
            if ! start_lb "$who" "$BE_ADDR" "$tag" "$proto"; then
                record_na "$workload" "$who" "$rep" "${metric_list[@]}" "LB CPU-s" "LB peak RSS MiB"
                continue
            fi
            "$fn" "$who" "$rep" "$tag"
            stop_lb "$who" "$workload" "$rep"
        done
    done
}

lb_alive() { [[ -z $LB_PID ]] || kill -0 "$LB_PID" 2>/dev/null; }

# ---------------------------------------------------------------------------------------------
# bulk: iperf3 -P 1 and -P 8.

BULK_METRICS=("P1 Gbit/s" "P1 LB CPU-s/GB" "P1 total CPU-s/GB" "P1 other load %"
    "P8 Gbit/s" "P8 LB CPU-s/GB" "P8 total CPU-s/GB" "P8 other load %")

bulk_run() {
    local who=$1 rep=$2 tag=$3 streams json gbps gb
    for streams in 1 8; do
        json="$LOGS/$tag-P$streams.json"
        meas_begin "$LB_PID" "$BE_PID"
        if run_bounded $((BULK_SECS + 30)) "$json" "$LOGS/$tag.client.stderr" \
            iperf3 -c 127.0.0.1 -p "$LB_PORT" -t "$BULK_SECS" -P "$streams" -J \
            && lb_alive && [[ $(jq -r '.error // empty' "$json") == "" ]]; then
            meas_end "$LB_PID" "$BE_PID"
            gbps=$(jq '.end.sum_received.bits_per_second / 1e9' "$json")
            gb=$(jq '.end.sum_received.bytes / 1e9' "$json")
            record bulk "P$streams Gbit/s" "$who" "$rep" "$(calc "$gbps")"
            record bulk "P$streams LB CPU-s/GB" "$who" "$rep" "$(calc "$LB_TICKS / $CLK_TCK / $gb")"
            record bulk "P$streams total CPU-s/GB" "$who" "$rep" "$(calc "$TOTAL_TICKS / $CLK_TCK / $gb")"
            record bulk "P$streams other load %" "$who" "$rep" "$OTHER_PCT"
            log "bulk $who rep $rep -P $streams: $(calc "$gbps") Gbit/s, $(calc "$gb") GB," \
                "LB $(calc "$LB_TICKS / $CLK_TCK") CPU-s, total $(calc "$TOTAL_TICKS / $CLK_TCK") CPU-s"
        else
            warn "bulk $who rep $rep -P $streams failed: $(jq -r '.error // empty' "$json" 2>/dev/null)"
            record_na bulk "$who" "$rep" "P$streams Gbit/s" "P$streams LB CPU-s/GB" \
                "P$streams total CPU-s/GB" "P$streams other load %"
        fi
    done
}

workload_bulk() {
    free_port
    BE_ADDR="127.0.0.1:$PORT"
    iperf3 -s -B 127.0.0.1 -p "$PORT" </dev/null >"$LOGS/iperf3-server.log" 2>&1 &
    BE_PID=$!
    track "$BE_PID"
    wait_listening "$BE_PID" "$PORT" 10 || die "iperf3 server did not start; see $LOGS/iperf3-server.log"
    each_rep bulk tcp bulk_run BULK_METRICS "${CONTESTANTS[@]}"
    stop_pid "$BE_PID"
}

# ---------------------------------------------------------------------------------------------
# connrate: connect, 64 B request, 64 B reply, close, from RATE_CONCURRENCY threads.

RATE_METRICS=("conn/s" "p50 µs" "p99 µs" "LB CPU µs/conn" "total CPU µs/conn" "errors" "other load %")

connrate_run() {
    local who=$1 rep=$2 tag=$3 json="$LOGS/$3.json" conns
    meas_begin "$LB_PID" "$BE_PID"
    if run_bounded $((RATE_SECS + 30)) "$json" "$LOGS/$tag.client.stderr" \
        "$CONNRATE" --target "127.0.0.1:$LB_PORT" --mode rate \
        --concurrency "$RATE_CONCURRENCY" --duration-secs "$RATE_SECS" \
        --max-conns 5000000 --payload "$RATE_PAYLOAD" \
        && lb_alive && [[ $(jq '.conns' "$json") -gt 0 ]]; then
        meas_end "$LB_PID" "$BE_PID"
        conns=$(jq '.conns' "$json")
        record connrate "conn/s" "$who" "$rep" "$(jq '.rate' "$json")"
        record connrate "p50 µs" "$who" "$rep" "$(jq '.p50_us' "$json")"
        record connrate "p99 µs" "$who" "$rep" "$(jq '.p99_us' "$json")"
        record connrate "LB CPU µs/conn" "$who" "$rep" "$(calc "$LB_TICKS / $CLK_TCK * 1e6 / $conns")"
        record connrate "total CPU µs/conn" "$who" "$rep" "$(calc "$TOTAL_TICKS / $CLK_TCK * 1e6 / $conns")"
        record connrate "errors" "$who" "$rep" "$(jq '.errors' "$json")"
        record connrate "other load %" "$who" "$rep" "$OTHER_PCT"
        log "connrate $who rep $rep: $(cat "$json")"
    else
        warn "connrate $who rep $rep failed; see ${LOGS#"$ROOT"/}/$tag.client.stderr"
        record_na connrate "$who" "$rep" "${RATE_METRICS[@]}"
    fi
}

workload_connrate() {
    bench_backend reply tcp --mode reply --payload "$RATE_PAYLOAD"
    each_rep connrate tcp connrate_run RATE_METRICS "${CONTESTANTS[@]}"
    stop_pid "$BE_PID"
}

# ---------------------------------------------------------------------------------------------
# keepalive: wrk over KEEPALIVE_CONNS persistent HTTP/1.1 connections to a fixed-200 responder.

KEEPALIVE_METRICS=("req/s" "p50 µs" "p99 µs" "LB CPU µs/req" "total CPU µs/req" "errors" "other load %")

# wrk prints latencies as 394.00us, 1.08ms or 2.00s.
wrk_us() {
    awk -v v="$1" 'BEGIN {
        n = v + 0
        if (v ~ /us$/) print n; else if (v ~ /ms$/) print n * 1000
        else if (v ~ /m$/) print n * 60e6; else if (v ~ /s$/) print n * 1e6; else print "n/a" }'
}

keepalive_run() {
    local who=$1 rep=$2 tag=$3 out="$LOGS/$3.wrk" reqs rps p50 p99 errs
    meas_begin "$LB_PID" "$BE_PID"
    if run_bounded $((RATE_SECS + 30)) "$out" "$LOGS/$tag.client.stderr" \
        wrk -t "$KEEPALIVE_THREADS" -c "$KEEPALIVE_CONNS" -d "${RATE_SECS}s" --latency \
        "http://127.0.0.1:$LB_PORT/" \
        && lb_alive && reqs=$(awk '/requests in/ {print $1; exit}' "$out") && ((${reqs:-0} > 0)); then
        meas_end "$LB_PID" "$BE_PID"
        rps=$(awk '/^Requests\/sec:/ {print $2}' "$out")
        p50=$(wrk_us "$(awk '$1 == "50%" {print $2; exit}' "$out")")
        p99=$(wrk_us "$(awk '$1 == "99%" {print $2; exit}' "$out")")
        # Socket errors (connect, read, write, timeout) and non-2xx/3xx answers.
        errs=$(awk '/Socket errors:/ { gsub(",", ""); s += $4 + $6 + $8 + $10 }
                    /Non-2xx or 3xx responses:/ { s += $NF } END { print s + 0 }' "$out")
        record keepalive "req/s" "$who" "$rep" "$rps"
        record keepalive "p50 µs" "$who" "$rep" "$p50"
        record keepalive "p99 µs" "$who" "$rep" "$p99"
        record keepalive "LB CPU µs/req" "$who" "$rep" "$(calc "$LB_TICKS / $CLK_TCK * 1e6 / $reqs")"
        record keepalive "total CPU µs/req" "$who" "$rep" "$(calc "$TOTAL_TICKS / $CLK_TCK * 1e6 / $reqs")"
        record keepalive "errors" "$who" "$rep" "$errs"
        record keepalive "other load %" "$who" "$rep" "$OTHER_PCT"
        log "keepalive $who rep $rep: $rps req/s, p50 $p50 µs, p99 $p99 µs, $errs errors"
    else
        warn "keepalive $who rep $rep failed; see ${LOGS#"$ROOT"/}/$tag.wrk"
        record_na keepalive "$who" "$rep" "${KEEPALIVE_METRICS[@]}"
    fi
}

workload_keepalive() {
    bench_backend http tcp --mode http
    each_rep keepalive tcp keepalive_run KEEPALIVE_METRICS "${CONTESTANTS[@]}"
    stop_pid "$BE_PID"
}

# ---------------------------------------------------------------------------------------------
# idle: IDLE_CONNS connections held open through the LB, then checked to still echo.

IDLE_METRICS=("KiB/idle conn" "RSS MiB held" "opened" "still echoing")

idle_run() {
    local who=$1 rep=$2 tag=$3 out="$LOGS/$3.jsonl" fifo="$LOGS/$3.stdin" cpid rss0 rss1=0 opened still i ok
    sleep 0.5
    rss0=$(tree_status_kib "$LB_PID" VmRSS)
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
    if ((ok)) && lb_alive; then
        sleep 1 # let the LB settle any lazily allocated per-connection state
        rss1=$(tree_status_kib "$LB_PID" VmRSS)
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
}

workload_idle() {
    bench_backend echo tcp --mode echo
    each_rep idle tcp idle_run IDLE_METRICS "${CONTESTANTS[@]}"
    stop_pid "$BE_PID"
}

# ---------------------------------------------------------------------------------------------
# udp: 64-byte request/response through the LB (HAProxy has no UDP: n/a), plus the no-proxy
# path (client -> backend) as the reference that shows what client and backend can carry.

UDP_METRICS=("replies/s" "p50 µs" "p99 µs" "LB CPU µs/req" "total CPU µs/req" "lost" "other load %")

udp_run() {
    local who=$1 rep=$2 tag=$3 json="$LOGS/$3.json" replies
    meas_begin "$LB_PID" "$BE_PID"
    if run_bounded $((RATE_SECS + 30)) "$json" "$LOGS/$tag.client.stderr" \
        "$UDPLOAD" --target "127.0.0.1:$LB_PORT" --sockets "$UDP_SOCKETS" --window "$UDP_WINDOW" \
        --threads "$UDP_CLIENT_THREADS" --duration-secs "$RATE_SECS" --payload 64 \
        && lb_alive && replies=$(jq '.replies' "$json") && ((${replies:-0} > 0)); then
        meas_end "$LB_PID" "$BE_PID"
        record udp "replies/s" "$who" "$rep" "$(jq '.rate' "$json")"
        record udp "p50 µs" "$who" "$rep" "$(jq '.p50_us' "$json")"
        record udp "p99 µs" "$who" "$rep" "$(jq '.p99_us' "$json")"
        if [[ -n $LB_PID ]]; then
            record udp "LB CPU µs/req" "$who" "$rep" "$(calc "$LB_TICKS / $CLK_TCK * 1e6 / $replies")"
        fi
        record udp "total CPU µs/req" "$who" "$rep" "$(calc "$TOTAL_TICKS / $CLK_TCK * 1e6 / $replies")"
        record udp "lost" "$who" "$rep" "$(jq '.lost + .late + .errors' "$json")"
        record udp "other load %" "$who" "$rep" "$OTHER_PCT"
        log "udp $who rep $rep: $(cat "$json")"
    else
        warn "udp $who rep $rep failed; see ${LOGS#"$ROOT"/}/$tag.client.stderr"
        record_na udp "$who" "$rep" "${UDP_METRICS[@]}"
    fi
}

workload_udp() {
    bench_backend udp-echo udp --mode udp-echo
    each_rep udp udp udp_run UDP_METRICS "${CONTESTANTS[@]}" direct
    stop_pid "$BE_PID"
}
