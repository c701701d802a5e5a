#!/usr/bin/env bash
# The benchmark: signed SMS webhooks against the gateway on each store, next to
# a baseline measured in the same run on the same machine (the same gateway
# answering GET /healthz).
#
#   bash scripts/bench.sh                  # both stores
#   BENCH_STORES=embedded bash scripts/bench.sh
#
# For each store it starts `switchboard serve` as its own process (embedded: in
# a temporary directory on disk; redis: redis://127.0.0.1:6379/0 under a unique
# key_prefix whose keys are deleted afterwards), then runs `loadgen`:
#   healthz      GET /healthz, closed loop, $BENCH_CONCURRENCY connections
#   sms          POST /webhooks/sms-main, closed loop, $BENCH_CONCURRENCY connections
#   sms@RATE     POST /webhooks/sms-main, open loop at $BENCH_RATE requests/s
#   healthz@RATE GET /healthz, open loop at $BENCH_RATE requests/s
#   sms-first    the first 20 webhooks after the gateway starts, at 20/s, with
#                no warm-up: first_ms is what the first one waited
#   sms-retry    one webhook over and over (a provider's retries), closed loop:
#                the cost of everything before the store write
#   healthz-wide, sms-wide   the two closed loops again with $BENCH_WIDE_CONCURRENCY
#                connections (4 x $BENCH_CONCURRENCY): enough webhooks in flight
#                that a log flush no longer leaves the cores idle
# each for $BENCH_SECONDS seconds, and prints one JSON line per run plus a table.
# Before the embedded store's runs, `loadgen --mode fsync` measures the disk
# itself (8 KiB write + fdatasync, back to back, in the same directory): the
# floor under any durable commit on this machine.
# Both runs of a store use the same gateway configuration, with
# server.pin_workers = true: the machine is the gateway's own.
# Every webhook has its own MessageSid; senders cycle through $BENCH_SENDERS
# numbers (4,000 unless set).
# Only 127.0.0.1 is contacted. Everything started here is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_PER_RUN="${BENCH_SECONDS:-10}"
CONCURRENCY="${BENCH_CONCURRENCY:-32}"
WIDE="${BENCH_WIDE_CONCURRENCY:-$((CONCURRENCY * 4))}"
# How many customers write: fewer senders make longer conversations.
SENDERS="${BENCH_SENDERS:-4000}"
RATE="${BENCH_RATE:-1000}"
STORES="${BENCH_STORES:-embedded redis}"
REDIS_URL="${BENCH_REDIS_URL:-redis://127.0.0.1:6379/0}"
RESULTS="${BENCH_RESULTS:-}"   # optional file to append the JSON lines to
# On a shared machine, BENCH_NICE=-10 (as root) runs the gateway and the load
# generator ahead of background work; the figures say how much CPU others took.
NICE=()
if [ -n "${BENCH_NICE:-}" ]; then NICE=(nice -n "$BENCH_NICE"); fi

cargo build --release --bins >&2
# The build leaves hundreds of MB of freshly linked binaries in the page
# cache; written back half a minute later, they would stall every log flush
# of whichever run is going on then. Flush them before any clock starts.
sync

WORK="$(mktemp -d "${TMPDIR:-/tmp}/switchboard-bench.XXXXXX")"
SERVER_PID=""
REDIS_PID=""
PREFIX=""
started_redis=""

redis_cli() { redis-cli -h 127.0.0.1 -p 6379 "$@"; }

delete_keys() {
  [ -n "$PREFIX" ] || return 0
  redis_cli --scan --pattern "${PREFIX}:*" 2>/dev/null \
    | xargs -r -d "\n" -n 500 redis-cli -h 127.0.0.1 -p 6379 unlink >/dev/null 2>&1 || true
  PREFIX=""
}

stop_server() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 1 100); do
      kill -0 "$SERVER_PID" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  SERVER_PID=""
}

cleanup() {
  stop_server
  delete_keys
  if [ -n "$started_redis" ]; then
    redis_cli shutdown nosave >/dev/null 2>&1 || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ensure_redis() {
  if redis_cli ping >/dev/null 2>&1; then
    return 0
  fi
  if ! command -v redis-server >/dev/null 2>&1; then
    echo "redis-server is not installed: skipping the redis store (scripts/test.sh installs it)" >&2
    return 1
  fi
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --logfile "$WORK/redis.log"
  started_redis=1
  for _ in $(seq 1 50); do
    redis_cli ping >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "redis-server did not answer" >&2
  return 1
}

write_config() { # store prefix → path of a config file
  local store="$1" prefix="$2" file="$WORK/$1.toml"
  cat >"$file" <<EOF
[server]
listen = "127.0.0.1:0"
public_url = "https://switchboard.bench.example"
pin_workers = true

[store]
backend = "$store"
path = "$WORK/data-$store"
redis_url = "$REDIS_URL"
key_prefix = "$prefix"

[[queues]]
id = "support"
name = "Support"
kind = "digital"

[[agents]]
id = "anne"
name = "Anne Shirley"
token = "bench-agent-token"
queues = ["support"]
can_transfer = true

[[channels]]
id = "sms-main"
kind = "sms"
name = "SMS"
queue = "support"
api_base = "http://127.0.0.1:9"
media_hosts = ["127.0.0.1"]
account_sid = "ACbench000000000000000000000000000"
auth_token = "bench-auth-token"
from = "+14155550100"
EOF
  echo "$file"
}

start_server() { # config → sets SERVER_PID and URL
  local config="$1" out="$WORK/server.out"
  : >"$out"
  SWITCHBOARD__SERVER__LISTEN=127.0.0.1:0 RUST_LOG=warn \
    "${NICE[@]}" target/release/switchboard serve --config "$config" >"$out" 2>"$WORK/server.err" &
  SERVER_PID=$!
  URL=""
  for _ in $(seq 1 200); do
    URL="$(sed -n 's/^switchboard listening on \(http:\/\/[0-9.:]*\).*/\1/p' "$out" | head -n1)"
    [ -n "$URL" ] && break
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
      break
    fi
    sleep 0.05
  done
  if [ -z "$URL" ]; then
    echo "the gateway did not start:" >&2
    cat "$WORK/server.err" >&2
    exit 1
  fi
}

CLK_TCK="$(getconf CLK_TCK)"

busy_cores() { # how many cores other processes keep busy, over one second
  local a b
  a=($(head -n1 /proc/stat))
  sleep 1
  b=($(head -n1 /proc/stat))
  local busy=$(( (b[1]+b[2]+b[3]+b[6]+b[7]+b[8]) - (a[1]+a[2]+a[3]+a[6]+a[7]+a[8]) ))
  echo "$busy $CLK_TCK" | awk '{printf "%.2f", $1 / $2}'
}

disk_activity() { # sectors written and discarded, and I/Os in flight, on every disk
  awk '$3 !~ /^(loop|ram|zram)/ {n += $10 + $12 + $17} END {print n + 0}' /proc/diskstats
}

# After heavy writing (the disk probe's thousands of flushes, or a finished
# store's data deleted), waits for a second in which no disk of this machine
# writes or discards anything (up to $BENCH_QUIET_WAIT seconds), then
# $BENCH_SETTLE seconds more (15): on a VM the host goes on writing what the
# guest already flushed, where the guest cannot see it, and runs started
# meanwhile came out slower. `/healthz` right after the disk probe: 40,625 /
# 39,663 / 45,466 requests/s, against 44,172 / 49,527 / 55,425 ten seconds
# after it (alternated). In the benchmark the baseline, run right after the
# probe or a deleted store, answered 43–48k in 8 of one day's 11 runs, while
# the same runs' `healthz-wide`, later, mostly answered 56–62k.
SETTLE="${BENCH_SETTLE:-15}"
settle_disk() {
  sync
  local a b
  for _ in $(seq 1 "$QUIET_WAIT"); do
    a="$(disk_activity)"
    sleep 1
    b="$(disk_activity)"
    [ "$a" = "$b" ] && break
  done
  sleep "$SETTLE"
}

# The figures are only worth something on an otherwise idle machine: wait (up
# to $BENCH_QUIET_WAIT seconds) for a second in which other processes use less
# than a fifth of a core, then go on either way; every run reports the CPU time
# other processes used meanwhile ("other_cpu_s").
QUIET_WAIT="${BENCH_QUIET_WAIT:-60}"
for _ in $(seq 1 "$QUIET_WAIT"); do
  [ "$(busy_cores | awk '{print ($1 < 0.2)}')" = 1 ] && break
done

echo "machine: $(nproc) cores${BENCH_NICE:+, benchmark at nice $BENCH_NICE}, $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1), Linux $(uname -r), $(date -u +%Y-%m-%dT%H:%MZ), load average $(cut -d' ' -f1-3 /proc/loadavg)"
ALL="$WORK/results.jsonl"
: >"$ALL"

record() { # store line → prints and keeps the line, tagged with the store
  local line="{\"store\":\"$1\",${2#\{}"
  echo "$line"
  echo "$line" >>"$ALL"
  if [ -n "$RESULTS" ]; then echo "$line" >>"$RESULTS"; fi
}

loadgen() { # store args... → one JSON line, tagged with the store
  local store="$1"
  shift
  local extra=()
  if [ "$store" = redis ] && [ -n "$REDIS_PID" ]; then extra=(--extra-pid "$REDIS_PID"); fi
  case " $* " in *" --mode sms "*) extra+=(--senders "$SENDERS") ;; esac
  # A run that gives its own --duration keeps it.
  case " $* " in *" --duration "*) ;; *) extra+=(--duration "$SECONDS_PER_RUN") ;; esac
  local line
  line="$(timeout $((SECONDS_PER_RUN * 3 + 60)) "${NICE[@]}" target/release/loadgen --url "$URL" \
    --pid "$SERVER_PID" --clk-tck "$CLK_TCK" "${extra[@]}" "$@")"
  record "$store" "$line"
}

for store in $STORES; do
  case "$store" in
    embedded)
      PREFIX=""
      mkdir -p "$WORK/disk"
      line="$(timeout 60 "${NICE[@]}" target/release/loadgen --mode fsync --dir "$WORK/disk" --duration 5)"
      record disk "$line"
      settle_disk
      ;;
    redis)
      ensure_redis || continue
      PREFIX="sbbench:$(date +%s):$$"
      REDIS_PID="$(redis_cli info server | sed -n 's/^process_id:\([0-9]*\).*/\1/p')"
      ;;
    *) echo "unknown store $store" >&2; exit 2 ;;
  esac
  config="$(write_config "$store" "${PREFIX:-switchboard}")"
  start_server "$config"
  echo "== $store: gateway pid $SERVER_PID at $URL" >&2
  # The gateway's first webhooks, before anything has warmed it up: what the
  # first caller after a start waits (first_ms).
  loadgen "$store" --mode sms --name sms-first --rate 20 --duration 1 --warmup 0 --config "$config"
  loadgen "$store" --mode healthz --name healthz --concurrency "$CONCURRENCY"
  loadgen "$store" --mode sms --name sms --concurrency "$CONCURRENCY" --config "$config"
  loadgen "$store" --mode sms --name "sms@$RATE" --rate "$RATE" --config "$config"
  loadgen "$store" --mode healthz --name "healthz@$RATE" --rate "$RATE"
  # Diagnostic: the same webhook again and again (a provider's retries) stops
  # at the dedupe check: HTTP, signature, parsing and one store read, no write.
  loadgen "$store" --mode sms --name sms-retry --same-sid --concurrency "$CONCURRENCY" \
    --config "$config"
  # Diagnostic: with $CONCURRENCY connections every webhook in flight can be
  # waiting on the same log flush, and the cores idle meanwhile; with more in
  # flight they do not. Both at the same width, so their ratio is fair too.
  loadgen "$store" --mode healthz --name healthz-wide --concurrency "$WIDE"
  loadgen "$store" --mode sms --name sms-wide --concurrency "$WIDE" --config "$config"
  if [ -s "$WORK/server.err" ]; then
    echo "-- gateway stderr ($store), last lines:" >&2
    tail -n 5 "$WORK/server.err" >&2
  fi
  stop_server
  delete_keys
  rm -rf "$WORK/data-$store"
  settle_disk
done

# The summary, as Markdown tables (what BENCHMARKS.md shows).
python3 - "$ALL" "$RATE" "$WIDE" <<'EOF' || true
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
rate, wide = sys.argv[2], sys.argv[3]
by = {}
for r in rows:
    by.setdefault(r["store"], {})[r["name"]] = r
def cpu(r):
    g = r.get("server_cpu_us_per_req") or 0
    x = r.get("extra_cpu_us_per_req")
    return "%.0f" % g if x is None else "%.0f + %.0f Redis = %.0f" % (g, x, g + x)
print()
d = by.get("disk", {}).get("fsync")
if d:
    print("Disk: %d x (8 KiB write + fdatasync) back to back: p50 %.2f ms, p90 %.2f ms, p99 %.2f ms, max %.2f ms" % (
        d["requests"], d["p50_ms"], d["p90_ms"], d["p99_ms"], d["max_ms"]))
    print()
print("| store | run | requests | errors | req/s | p50 ms | p99 ms | max ms | gateway CPU us/req | load generator CPU us/req | other CPU s |")
print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for store, runs in by.items():
    if store == "disk":
        continue
    for name, r in runs.items():
        # A run of a few requests (sms-first) is mostly idle: its CPU per request says nothing.
        few = r["requests"] < 1000
        print("| %s | %s | %d | %d | %.0f | %.2f | %.2f | %.2f | %s | %s | %.1f |" % (
            store, name, r["requests"], r["errors"], r["rps"], r["p50_ms"], r["p99_ms"], r["max_ms"],
            "—" if few else cpu(r), "—" if few else "%.0f" % (r.get("loadgen_cpu_us_per_req") or 0),
            r.get("other_cpu_s") or 0))
print()
print("| store | baseline req/s (p50/p99 ms) | webhooks req/s (p50/p99 ms) | webhooks / baseline | webhooks at %s/s: p50 / p99 / max ms | gateway's own time at %s/s: p99 within / share within 5 ms | CPU us per webhook (max / at %s/s) | gateway memory grown per webhook (max rate) | with %s connections: baseline → webhooks req/s, ratio | first webhook after a start ms |" % (rate, rate, rate, wide))
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for store, runs in by.items():
    h, s, sr = runs.get("healthz"), runs.get("sms"), runs.get("sms@" + rate)
    if not (h and s and sr):
        continue
    own = "%s ms / %s%%" % (sr.get("server_p99_le_ms"), sr.get("server_pct_under_5ms"))
    grew = s.get("server_rss_grew_kb_per_req")
    grew = "—" if grew is None else "%.2f KB" % grew
    hw, sw = runs.get("healthz-wide"), runs.get("sms-wide")
    widened = "—" if not (hw and sw) else "%.0f → %.0f, %.0f%%" % (hw["rps"], sw["rps"], 100 * sw["rps"] / hw["rps"])
    first = runs.get("sms-first", {}).get("first_ms")
    first = "—" if first is None else "%.2f" % first
    print("| %s | %.0f (%.2f / %.2f) | %.0f (%.2f / %.2f) | %.0f%% | %.2f / %.2f / %.2f | %s | %s / %s | %s | %s | %s |" % (
        store, h["rps"], h["p50_ms"], h["p99_ms"], s["rps"], s["p50_ms"], s["p99_ms"],
        100 * s["rps"] / h["rps"], sr["p50_ms"], sr["p99_ms"], sr["max_ms"], own, cpu(s), cpu(sr), grew, widened, first))
EOF

if grep -q '"errors":[1-9]' "$ALL"; then
  echo "some requests failed" >&2
  exit 1
fi
