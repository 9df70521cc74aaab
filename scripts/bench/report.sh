# scripts/bench/report.sh: sourced by scripts/bench.sh. Raw rows (CSV), medians over
# repetitions, and the outputs: bench-results/latest.{md,csv,json,png}.

# ---------------------------------------------------------------------------------------------
# Raw results: one CSV row per measurement; "n/a" for a contestant that could not run.

METRICS=() # "workload|metric" in first-seen order
init_results() { echo "run,workload,metric,contestant,rep,value" >"$RAW_CSV"; }
record() {
    local workload=$1 metric=$2 who=$3 rep=$4 value=$5 key="$1|$2" m
    for m in "${METRICS[@]}"; do [[ $m == "$key" ]] && key=; done
    [[ -z $key ]] || METRICS+=("$key")
    echo "$STAMP,$workload,$metric,$who,$rep,${value:-n/a}" >>"$RAW_CSV"
}
record_na() {
    local workload=$1 who=$2 rep=$3 metric
    shift 3
    for metric in "$@"; do record "$workload" "$metric" "$who" "$rep" n/a; done
}

# The settings and circumstances of a run, kept next to its raw rows so that --report-from can
# rewrite the report later (after a change to this file) exactly as the run would have.
RUN_VARS=(MODE_NAME REPS BULK_SECS RATE_SECS IDLE_CONNS LB_THREADS RATE_CONCURRENCY
    KEEPALIVE_THREADS KEEPALIVE_CONNS UDP_SOCKETS UDP_WINDOW BUSY_AT_START VERSIONS)
save_run_info() {
    VERSIONS=$(versions_line)
    declare -p "${RUN_VARS[@]}" >"$LOGS/run.env"
}
load_run_info() {
    # declare -p lines; -g so that they set globals from inside this function.
    # shellcheck source=/dev/null
    . <(sed 's/^declare /declare -g /' "$LOGS/run.env")
    mapfile -t METRICS < <(awk -F, 'NR > 1 && !seen[$2 "|" $3]++ { print $2 "|" $3 }' "$RAW_CSV")
}

# Metrics in the chart: throughput (higher is better) and costs (lower is better).
CHART_HIGHER=("bulk|P1 Gbit/s" "bulk|P8 Gbit/s" "connrate|conn/s" "keepalive|req/s" "udp|replies/s")
CHART_LOWER=("bulk|P1 LB CPU-s/GB" "bulk|P8 LB CPU-s/GB" "connrate|LB CPU µs/conn" "connrate|p99 µs"
    "keepalive|LB CPU µs/req" "keepalive|p99 µs" "idle|KiB/idle conn" "udp|LB CPU µs/req" "udp|p99 µs")

# Writes MEDIANS (tab-separated: workload, metric, ringlb, haproxy, nginx, direct, ringlb/haproxy,
# ringlb/nginx, ringlb-epoll, ringlb/ringlb-epoll, ringlb-epoll/haproxy — udp: /nginx) in METRICS
# order; the epoll columns come last so the chart's column numbers stay put. A contestant never measured for a metric is "-", one that could
# not run "n/a". Ratios of noise readings are "-".
compute_medians() {
    local key
    : >"$MEDIANS"
    for key in "${METRICS[@]}"; do
        awk -F, -v key="$key" '
            function median(list,    a, n, i, j, t) {
                n = split(list, a, " ")
                if (n == 0) return "n/a"
                for (i = 2; i <= n; i++)
                    for (j = i; j > 1 && a[j - 1] + 0 > a[j] + 0; j--) { t = a[j]; a[j] = a[j - 1]; a[j - 1] = t }
                return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
            }
            function cell(who) { return (who in seen) ? median(vals[who]) : "-" }
            function ratio(a, b) {
                return (a != "n/a" && a != "-" && b != "n/a" && b != "-" && b + 0 != 0) ? sprintf("%.2f", a / b) : "n/a"
            }
            NR > 1 && $2 "|" $3 == key {
                seen[$4] = 1
                if ($6 != "n/a") vals[$4] = vals[$4] " " $6
            }
            END {
                split(key, k, "|")
                r = cell("ringlb"); h = cell("haproxy"); n = cell("nginx"); d = cell("direct")
                e = cell("ringlb-epoll")
                rh = ratio(r, h); rn = ratio(r, n); re = ratio(r, e)
                eh = (h != "n/a" && h != "-") ? ratio(e, h) : ratio(e, n)
                if (k[2] ~ /other load/) { rh = "-"; rn = "-"; re = "-"; eh = "-" }
                printf "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", k[1], k[2], r, h, n, d, rh, rn, e, re, eh
            }' "$RAW_CSV" >>"$MEDIANS"
    done
}

# Human-friendly number: integers as such, else 3 significant digits.
fmt_awk='function fmt(v) {
    if (v == "n/a" || v == "-") return v
    v += 0
    if (v == int(v) && (v >= 100 || v == 0)) return sprintf("%d", v)
    if (v >= 100) return sprintf("%.0f", v)
    if (v >= 10) return sprintf("%.1f", v)
    return sprintf("%.3g", v)
}'

machine_line() {
    local cpu mem
    cpu=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)
    mem=$(awk '/^MemTotal:/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)
    echo "$(nproc) CPUs ($cpu), $mem RAM, kernel $(uname -r), $(. /etc/os-release && echo "$PRETTY_NAME")"
}

versions_line() {
    local rev
    if rev=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null); then
        git -C "$ROOT" diff --quiet HEAD -- 2>/dev/null || rev+=" + local changes"
    else
        rev="(uncommitted tree)"
    fi
    echo "ringlb $rev; $(haproxy -v | head -n 1 | awk '{print "HAProxy", $3}');" \
        "$(nginx -v 2>&1 | sed 's/^nginx version: nginx\//NGINX /');" \
        "$(iperf3 --version | head -n 1 | awk '{print "iperf3", $2}'); $(wrk -v 2>&1 | head -n 1 | awk '{print "wrk", $2}')"
}

write_markdown() {
    local md=$1
    {
        echo "## ringlb vs HAProxy vs NGINX ($MODE_NAME run, $STAMP)"
        echo
        echo "Machine: $(machine_line)."
        echo "Versions: ${VERSIONS:-$(versions_line)}."
        echo "Machine ${BUSY_AT_START:-?}% busy (all CPUs) just before the run; see the other load % rows."
        echo
        echo "Everything on loopback on the same cores: load generator, backend and LB compete for the"
        echo "CPUs. Medians of $REPS repetition(s); every LB with $LB_THREADS workers/threads and logging off, started"
        echo "fresh for each workload and repetition, order rotated. NGINX: stream module, \`reuseport\`."
        echo
        echo "- bulk: iperf3 ${BULK_SECS} s, 1 and 8 streams."
        echo "- connrate: connect, 64 B each way, close; $RATE_CONCURRENCY threads, ${RATE_SECS} s."
        echo "- keepalive: wrk -t $KEEPALIVE_THREADS -c $KEEPALIVE_CONNS, ${RATE_SECS} s, to a fixed 200 response (bench_backend --mode http)."
        echo "- idle: $IDLE_CONNS connections opened and held, then each must still echo."
        echo "- udp: 64 B request/response, $UDP_SOCKETS client sockets (own source IP each) × $UDP_WINDOW outstanding,"
        echo "  ${RATE_SECS} s; replies/s = round trips per second (each crosses the LB twice); lost = unanswered"
        echo "  after 200 ms."
        echo "- **HAProxy has no UDP: its udp cells are n/a and udp ratios are to NGINX.** \"no proxy\" is"
        echo "  the client talking to the backend directly: what client and backend can carry."
        echo "- LB CPU = utime+stime of the LB's processes (NGINX: master + workers), which includes loopback"
        echo "  delivery its sends trigger; total CPU = LB + load generator + backend + ksoftirqd."
        echo "  LB CPU-s = over the LB's whole life in that workload; peak RSS = VmHWM (NGINX: summed over"
        echo "  master + workers, so pages they share count more than once)."
        echo "- other load % = CPU used meanwhile by processes outside the benchmark (and softirq work done"
        echo "  while a CPU was otherwise idle), in % of one core: the noise level (no ratio)."
        echo "- Higher is better for Gbit/s, conn/s, req/s, replies/s; lower for the rest."
        echo
        echo "- ringlb = io_uring backend; ringlb-epoll = the same binary with \`RINGLB_IO=epoll\`."
        echo "  io_uring/epoll is what the ring buys; epoll/HAProxy (udp: /NGINX) whether the fallback holds up."
        echo
        echo "| workload | metric | ringlb | ringlb-epoll | HAProxy | NGINX | no proxy | ringlb/HAProxy | ringlb/NGINX | io_uring/epoll | epoll/HAProxy |"
        echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        awk -F'\t' "$fmt_awk"'
            { printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", $1, $2, fmt($3), fmt($9), fmt($4), fmt($5), fmt($6), $7, $8, $10, $11 }' \
            "$MEDIANS"
        if [[ -s $OUT_DIR/latest.png ]]; then
            echo
            echo "![ringlb vs HAProxy vs NGINX, normalised to HAProxy (UDP: NGINX)](latest.png)"
        fi
    } >"$md"
}

# JSON: run settings, machine, medians (numbers or null) and every raw row.
write_json() {
    local json=$1
    jq -n --rawfile med "$MEDIANS" --rawfile raw "$RAW_CSV" \
        --arg stamp "$STAMP" --arg mode "$MODE_NAME" --argjson reps "$REPS" \
        --arg machine "$(machine_line)" --arg versions "${VERSIONS:-$(versions_line)}" \
        --argjson nproc "$(nproc)" --arg kernel "$(uname -r)" \
        --arg cpu "$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)" \
        --argjson mem_kib "$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)" \
        --argjson busy "${BUSY_AT_START:-null}" \
        --argjson settings "$(jq -n --argjson bulk_secs "$BULK_SECS" --argjson rate_secs "$RATE_SECS" \
            --argjson idle_conns "$IDLE_CONNS" --argjson lb_threads "$LB_THREADS" \
            --argjson rate_concurrency "$RATE_CONCURRENCY" --argjson keepalive_conns "$KEEPALIVE_CONNS" \
            --argjson udp_sockets "$UDP_SOCKETS" --argjson udp_window "$UDP_WINDOW" '$ARGS.named')" '
        def num: if . == "n/a" or . == "-" then null else tonumber end;
        {
          run: $stamp, mode: $mode, repetitions: $reps, settings: $settings,
          machine: { description: $machine, nproc: $nproc, cpu: $cpu, kernel: $kernel, mem_kib: $mem_kib,
                     busy_pct_at_start: $busy },
          versions: $versions,
          medians: [ $med | split("\n")[] | select(length > 0) | split("\t") | {
              workload: .[0], metric: .[1], ringlb: (.[2] | num), haproxy: (.[3] | num),
              nginx: (.[4] | num), no_proxy: (.[5] | num),
              ratio_ringlb_haproxy: (.[6] | num), ratio_ringlb_nginx: (.[7] | num),
              ringlb_epoll: (.[8] | num), ratio_io_uring_epoll: (.[9] | num),
              ratio_epoll_haproxy: (.[10] | num) } ],
          raw: [ $raw | split("\n")[1:][] | select(length > 0) | split(",") | {
              workload: .[1], metric: .[2], contestant: .[3], rep: (.[4] | tonumber), value: (.[5] | num) } ]
        }' >"$json"
}

# chart_panel TITLE N TSV: one panel of the chart, as gnuplot commands on stdout: a bar per
# contestant for each of the N rows of TSV (x, label, four ratios, four value labels), with the
# tick labels at the group centres (xtic() in a plot would put them under one bar).
chart_panel() {
    local title=$1 n=$2 tsv=$3 tics
    tics=$(awk -F'\t' '{ printf "%s\"%s\" %d", (NR > 1 ? ", " : ""), $2, $1 }' "$tsv")
    cat <<EOF
set title "$title"
set xrange [-0.5:$n-0.5]
set xtics ($tics)
plot "$tsv" using (\$1-0.3):3 with boxes lc rgb "#1f77b4" title "ringlb", \\
     "" using (\$1-0.1):4 with boxes lc rgb "#ff7f0e" title "HAProxy", \\
     "" using (\$1+0.1):5 with boxes lc rgb "#2ca02c" title "NGINX", \\
     "" using (\$1+0.3):6 with boxes lc rgb "#999999" title "no proxy", \\
     "" using (\$1-0.3):3:7 with labels offset 0,0.7 font ",8" notitle, \\
     "" using (\$1-0.1):4:8 with labels offset 0,0.7 font ",8" notitle, \\
     "" using (\$1+0.1):5:9 with labels offset 0,0.7 font ",8" notitle, \\
     "" using (\$1+0.3):6:10 with labels offset 0,0.7 font ",8" notitle
EOF
}

# PNG: grouped bars per metric, normalised to HAProxy = 1 (udp: NGINX = 1), one colour per
# contestant; top panel throughput, bottom panel costs.
write_chart() {
    local png=$1 dat="$LOGS/chart" gp="$LOGS/chart.gp" panel
    command -v gnuplot >/dev/null || { warn "no gnuplot: no chart"; return 0; }
    for panel in higher lower; do
        local -n keys="CHART_${panel^^}"
        local key i=0
        : >"$dat-$panel.tsv"
        for key in "${keys[@]}"; do
            awk -F'\t' -v key="$key" -v i="$i" "$fmt_awk"'
                function norm(v, b) { return (v == "n/a" || v == "-" || b == "n/a" || b == "-" || b + 0 == 0) ? "?" : sprintf("%.6f", v / b) }
                function lab(v) { return v == "?" ? "" : sprintf("%.2f", v) }
                $1 "|" $2 == key {
                    base = ($4 != "n/a" && $4 != "-") ? $4 : $5
                    bname = ($4 != "n/a" && $4 != "-") ? "HAProxy" : "NGINX"
                    r = norm($3, base); h = norm($4, base); n = norm($5, base); d = norm($6, base)
                    printf "%d\t%s\\n%s\\n(%s %s)\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", i, $1, $2, bname, fmt(base),
                        r, h, n, d, lab(r), lab(h), lab(n), lab(d)
                }' "$MEDIANS" >>"$dat-$panel.tsv"
            i=$((i + 1))
        done
        unset -n keys
    done
    {
        cat <<EOF
set terminal pngcairo size 1500,1100 font "DejaVu Sans,10"
set output "$png"
set datafile separator "\t"
set datafile missing "?"
set style fill solid 0.85 border -1
set boxwidth 0.19
set grid ytics
set yrange [0:*]
set xtics scale 0 font ",9"
set key outside right top
set bmargin 5
set arrow from graph 0, first 1 to graph 1, first 1 nohead dashtype 2 lc rgb "#555555"
set multiplot layout 2,1 title "ringlb vs HAProxy vs NGINX ($MODE_NAME run $STAMP; $(nproc) CPUs, kernel $(uname -r)) — normalised: HAProxy = 1 (udp: NGINX = 1)"
EOF
        chart_panel "throughput: higher is better" "${#CHART_HIGHER[@]}" "$dat-higher.tsv"
        chart_panel "cost per unit of work, latency, memory: lower is better" \
            "${#CHART_LOWER[@]}" "$dat-lower.tsv"
        echo "unset multiplot"
    } >"$gp"
    gnuplot "$gp" 2>"$LOGS/chart.log" || { warn "gnuplot failed; see ${LOGS#"$ROOT"/}/chart.log"; return 0; }
}

report() {
    local md="$OUT_DIR/latest.md"
    MEDIANS="$LOGS/medians.tsv"
    compute_medians
    rm -f "$OUT_DIR/latest.png"
    write_chart "$OUT_DIR/latest.png"
    write_markdown "$md"
    cp "$RAW_CSV" "$OUT_DIR/latest.csv"
    write_json "$OUT_DIR/latest.json" || warn "could not write latest.json"
    echo
    cat "$md"
    echo
    log "wrote bench-results/latest.{md,csv,json,png} and ${RAW_CSV#"$ROOT"/}"
}
