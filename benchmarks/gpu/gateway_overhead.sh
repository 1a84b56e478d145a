#!/bin/bash
# Gateway overhead over a vLLM engine that is already running: start `loragate serve` in external mode over it
# (its registry must already hold the base and the adapters, see register.py), then run bench_gateway.py for each
# of MODES (plain and streamed chat) against the engine and the gateway; tables in $R/bench_{plain,stream}.txt, the
# gateway's and the engine front-end's CPU use (per-second samples) in $R/cpu_*.txt.
#   ENGINE_URL=... ENGINE_PID=... REG=... BASE=... ADAPTERS=a,b,c R=... bash benchmarks/gpu/gateway_overhead.sh
set -u
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PY:-python3}; R=${R:-$PWD/res}; mkdir -p $R
GPORT=${GATEWAY_PORT:-8100}; G=http://127.0.0.1:$GPORT
N_ADAPTERS=$(echo "$ADAPTERS" | tr ',' '\n' | grep -c .)
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
log() { echo "[$(date +%T)] $*"; }

cpu_sampler() {  # $1 pid, $2 out: one line a second, "seconds-since-start cpu%" (all threads of the process)
  local tick=$(getconf CLK_TCK) last now t=0
  last=$(awk '{print $14+$15}' /proc/$1/stat 2>/dev/null) || return
  while now=$(awk '{print $14+$15}' /proc/$1/stat 2>/dev/null); do
    echo "$t $(( (now - last) * 100 / tick ))"; last=$now; t=$((t + 1)); sleep 1
  done > $2
}

# 1. the gateway, external mode, as many adapter slots as adapters
LORAGATE_HEALTH_INTERVAL_S=2 $PY -m gateway --engine-url $ENGINE_URL --base-name $BASE --registry $REG \
  --port $GPORT --max-loras ${MAX_LORAS:-$N_ADAPTERS} --max-lora-rank ${MAX_LORA_RANK:-16} \
  > $R/gateway.log 2>&1 < /dev/null &
GPID=$!
trap 'kill $GPID 2>/dev/null' EXIT
for i in $(seq 1 120); do
  $PY -c "import sys, httpx; sys.exit(httpx.get('$G/readyz', timeout=2).status_code != 200)" 2>/dev/null && break
  kill -0 $GPID 2>/dev/null || { log "GATEWAY DIED"; cat $R/gateway.log; exit 1; }
  sleep 0.5
done
log "gateway ready (pid $GPID): $(head -c 300 $R/gateway.log | tr '\n' ' ')"
$PY -c "import uvloop, httptools; print('uvloop', uvloop.__version__, 'httptools', httptools.__version__)" 2>&1

# 2. plain, then streamed; the samplers run through both
cpu_sampler $GPID $R/cpu_gateway.txt & S1=$!
[ -n "${ENGINE_PID:-}" ] && { cpu_sampler $ENGINE_PID $R/cpu_engine_frontend.txt & S2=$!; }
for mode in ${MODES:-plain stream}; do
  T=$(date +%s)
  $PY $REPO/benchmarks/bench_gateway.py --engine-url $ENGINE_URL --gateway-url $G --base $BASE --adapters $ADAPTERS \
    --assignment round-robin --requests ${REQUESTS:-256} --concurrency ${CONCURRENCY:-128} \
    --max-tokens ${MAX_TOKENS:-128} --prompt-words ${PROMPT_WORDS:-150} --rounds ${ROUNDS:-5} \
    --warmup ${WARMUP:-128} $([ $mode = stream ] && echo --stream) > $R/bench_$mode.txt 2> $R/bench_$mode.log
  log "bench $mode rc=$? in $(( $(date +%s) - T )) s"; cat $R/bench_$mode.log $R/bench_$mode.txt
done
kill $S1 ${S2:-} 2>/dev/null
for f in $R/cpu_gateway.txt $R/cpu_engine_frontend.txt; do
  [ -s $f ] && $PY -c "
import statistics, sys
v = sorted(int(l.split()[1]) for l in open('$f') if l.strip())
busy = [x for x in v if x >= 5] or [0]
print('$(basename $f)', 'samples', len(v), 'busy', len(busy), 'median busy %', statistics.median(busy), 'p90 %', busy[int(0.9 * (len(busy) - 1))], 'max %', v[-1])"
done
grep -E "WARNING|ERROR" $R/gateway.log | head -20
