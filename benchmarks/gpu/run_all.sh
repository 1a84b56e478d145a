#!/bin/bash
# The data plane on a lent GPU (README "Gateway overhead on an H200"), with the kit in ../shared/gpu (its README):
#   calls 1-2 as the kit says; call 3: bash .gpu/scripts/callpart.sh 3 && bash benchmarks/gpu/small_model.sh
#   call 4: cp benchmarks/gpu/run_all.sh .gpu/scripts/ && bash .gpu/scripts/calllast.sh 4 570   (timeout_s 600)
# (carry .gpu/p4, .gpu/scripts and .gpu/wrk). calllast.sh starts this script with setsid from the repository root and
# packs $HOME/res into $OUT when it writes DONE. Steps: install vLLM from the parts -> wait for the 7B-shaped model
# and its 34 adapters (call 1) and the 1B-shaped one and its 8 (call 3) -> registries -> both vLLM engines at once
# (--kv-cache-memory-bytes: they share the GPU) -> gateway over the 7B engine: bench_gateway.py at concurrency 1, 16
# and 128, plain and streamed, 3 shuffled rounds, direct-2 as the noise row -> cold adapters (cold_load.py) ->
# gateways with 1 and 4 workers over the 1B engine: short_requests.py (wrk) -> bench_dataplane.py on this host's
# CPUs (instant upstream, 1 vs 4 workers) -> "place": the 7B engine stops and placement.sh starts four 3B engines
# for the next call (call 3 then builds that model too: small_model.sh 1b 3b). On a machine still warm:
# cp benchmarks/gpu/run_all.sh .gpu/scripts/ && bash .gpu/scripts/rerun.sh (carry .gpu/scripts, .gpu/wrk).
# Knobs: ROUNDS (for concurrency 1 and 16; 128 gets 3), STEPS (default "big cold small cpu"), SETS (the
# concurrency levels of "big", default "1 16 128"), X2=1 (a second gateway with --workers 2 as one more target),
# JITTER_MS (bench_gateway.py's direct-jitter row: direct sends paused 0-J ms), JITTER_ALL_SET="C N TOKENS ROUNDS"
# (one more plain set with every target's sends paused 0-JITTER_MS ms).
R=$HOME/res; mkdir -p $R
BIG=$HOME/models/llama7b-rand; BIG_NAME=llama7b-rand; SMALL=$HOME/models/llama1b-rand; SMALL_NAME=llama1b-rand
E7=http://127.0.0.1:8000; E1=http://127.0.0.1:8001; G7=http://127.0.0.1:8100; G1=http://127.0.0.1:8201; G4=http://127.0.0.1:8204
ROUNDS=${ROUNDS:-3}; STEPS=${STEPS:-big cold small cpu}; REPO=$PWD
now() { date +%s.%N; }
el() { python3 -c "print(f'{$(now)-$1:.1f}')"; }
log() { echo "[$(date +%T)] $*"; }
START=$(now)
export VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
export PYTHONUNBUFFERED=1 VLLM_ALLOW_RUNTIME_LORA_UPDATING=True
L=$HOME/lg; rm -rf $L; mkdir -p $L; cp -r gateway adapters_registry loragate training benchmarks $L/ || exit 1
[ -d .gpu/wrk ] && { rm -rf $HOME/wrk; cp -r .gpu/wrk $HOME/wrk; }
export WRK=$HOME/wrk/wrk LD_LIBRARY_PATH=$HOME/wrk${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fail() { log "$*"; echo FAILED > $R/DONE; exit 1; }

# 1. install: reassemble the parts, extract the pip --target tree (once per machine)
T=$(now)
if [ ! -f $HOME/site/vllm/__init__.py ]; then
  cat $HOME/parts/stage.tar.xz.part* > $HOME/stage.tar.xz && rm -rf $HOME/site && mkdir -p $HOME/site
  xz -T0 -dc $HOME/stage.tar.xz | tar -C $HOME/site -xf -
fi
log "install took $(el $T) s"
export PYTHONPATH=$HOME/site
python3 -c "import vllm, torch, aiohttp; print('vllm', vllm.__version__, 'torch', torch.__version__, 'aiohttp', aiohttp.__version__, torch.cuda.get_device_name(0))" || fail "IMPORT FAILED"
$WRK --version 2>&1 | head -1

# placement alone (STEPS="place"): no 7B engine, the four 3B engines start as soon as their model is built
if [ "$STEPS" = place ]; then
  while [ ! -f $R/b3_end ]; do sleep 2; done
  grep -q SMALL_DONE $R/b3.log || { tail -30 $R/b3.log; fail "3B MODEL FAILED"; }
  bash $REPO/benchmarks/gpu/placement.sh start $L; T=$(now)
  for p in 8300 8301 8302 8303; do  # healthy before this call ends, so the next one has all its time for runs
    for i in $(seq 1 400); do
      python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$p/health', timeout=2)" 2>/dev/null && break
      sleep 1
    done
  done
  log "four 3B engines healthy after $(el $T) s"; nvidia-smi --query-gpu=memory.used --format=csv,noheader
  log "ALL DONE at $(el $START) s"; echo OK > $R/DONE; exit 0
fi

# 2. the models (call 1 started the 7B one, call 3 the 1B one)
while [ ! -f $R/prep_end ]; do sleep 2; done
grep -q PREP_DONE $R/prep.log || { tail -30 $R/prep.log; fail "PREP FAILED"; }
if [[ " $STEPS " == *" small "* ]]; then
  while [ ! -f $R/small_end ]; do sleep 2; done
  grep -q SMALL_DONE $R/small.log || { tail -30 $R/small.log; fail "SMALL MODEL FAILED"; }
fi

# 3. registries, while the engines start: 8 hot and 8 cold adapters on the 7B base, 8 on the 1B one
rm -rf $HOME/reg7 $HOME/reg1
( cd $L && mkdir -p $HOME/cold && for i in $(seq 8 15); do ln -sfn $HOME/loras/lora$i $HOME/cold/cold$((i - 8)); done
  PYTHONPATH=$L:$PYTHONPATH python3 benchmarks/gpu/register.py $HOME/reg7 $BIG $BIG_NAME \
    $(for i in $(seq 0 7); do echo -n "$HOME/loras/lora$i "; done) $(for i in $(seq 0 7); do echo -n "$HOME/cold/cold$i "; done)
  if [[ " $STEPS " == *" small "* ]]; then
    PYTHONPATH=$L:$PYTHONPATH python3 benchmarks/gpu/register.py $HOME/reg1 $SMALL $SMALL_NAME $HOME/loras1b/small*
  fi ) > $R/register.log 2>&1 & RPID=$!
T=$(now)
setsid python3 -m vllm.entrypoints.openai.api_server --model $BIG --served-model-name $BIG_NAME --dtype bfloat16 \
  --max-model-len 2048 --port 8000 --enable-lora --max-lora-rank 16 --max-loras 8 --max-cpu-loras 32 \
  --gpu-memory-utilization 0.5 --kv-cache-memory-bytes 42949672960 --disable-uvicorn-access-log > $R/server7.log 2>&1 < /dev/null &
S7=$!
S1=; ENGINES="$E7 $S7 server7"
if [[ " $STEPS " == *" small "* ]]; then
  setsid python3 -m vllm.entrypoints.openai.api_server --model $SMALL --served-model-name $SMALL_NAME --dtype bfloat16 \
    --max-model-len 1024 --port 8001 --enable-lora --max-lora-rank 16 --max-loras 8 --max-cpu-loras 16 \
    --gpu-memory-utilization 0.3 --kv-cache-memory-bytes 17179869184 --disable-uvicorn-access-log > $R/server1.log 2>&1 < /dev/null &
  S1=$!; ENGINES="$ENGINES,$E1 $S1 server1"
fi
trap 'kill -TERM -- -$S7 ${S1:+-$S1} 2>/dev/null' EXIT
IFS=, read -ra ENGINE_LIST <<< "$ENGINES"
for url_pid in "${ENGINE_LIST[@]}"; do
  set -- $url_pid
  for i in $(seq 1 400); do
    python3 -c "import urllib.request; urllib.request.urlopen('$1/health', timeout=2)" 2>/dev/null && break
    kill -0 $2 2>/dev/null || { tail -60 $R/$3.log; fail "$3 DIED"; }
    sleep 1
  done
done
log "both engines healthy after $(el $T) s"
wait $RPID || { cat $R/register.log; fail "REGISTER FAILED"; }
cat $R/register.log

gateway() {  # $1 port, $2 engine url, $3 base, $4 registry, $5 workers, $6 log
  LORAGATE_HEALTH_INTERVAL_S=2 python3 -m gateway --engine-url $2 --base-name $3 --registry $4 --port $1 \
    --max-loras 8 --max-cpu-loras 32 --max-lora-rank 16 --workers $5 > $6 2>&1 < /dev/null &
  local pid=$!
  for i in $(seq 1 120); do
    python3 -c "import sys, httpx; sys.exit(httpx.get('http://127.0.0.1:$1/readyz', timeout=2).status_code != 200)" 2>/dev/null && break
    kill -0 $pid 2>/dev/null || { cat $6; fail "GATEWAY $1 DIED"; }
    sleep 0.5
  done
  echo $pid
}
cpu_sampler() {  # $1 pid, $2 out: one line a second, "seconds-since-start cpu%" (all threads of the process)
  local tick=$(getconf CLK_TCK) last now t=0
  last=$(awk '{print $14+$15}' /proc/$1/stat 2>/dev/null) || return
  while now=$(awk '{print $14+$15}' /proc/$1/stat 2>/dev/null); do
    echo "$t $(( (now - last) * 100 / tick ))"; last=$now; t=$((t + 1)); sleep 1
  done > $2
}
export PYTHONPATH=$L:$HOME/site
cd $L

# 4. the gateway over the 7B engine: concurrency 1, 16, 128; plain and streamed
HOT=$(for i in $(seq 0 7); do echo -n "lora$i,"; done); HOT=${HOT%,}
if [[ " $STEPS " == *" big "* ]]; then
  GP=$(gateway 8100 $E7 $BIG_NAME $HOME/reg7 1 $R/gateway7.log)
  log "gateway over the 7B engine ready (pid $GP)"
  EXTRA=""
  if [ "${X2:-0}" = 1 ]; then
    GP2=$(gateway 8102 $E7 $BIG_NAME $HOME/reg7 2 $R/gateway7_x2.log); EXTRA="--target gateway-x2=http://127.0.0.1:8102"
    log "gateway --workers 2 ready (pid $GP2)"
  fi
  cpu_sampler $GP $R/cpu_gateway7.txt & CS=$!
  for spec in "1 12 32 $ROUNDS" "16 64 64 $ROUNDS" "128 256 128 3"; do
    set -- $spec
    [[ " ${SETS:-1 16 128} " == *" $1 "* ]] || continue
    for mode in plain stream; do
      T=$(now)
      python3 benchmarks/bench_gateway.py --engine-url $E7 --gateway-url $G7 --base $BIG_NAME --adapters $HOT \
        --assignment round-robin --concurrency $1 --requests $2 --max-tokens $3 --prompt-words 150 --rounds $4 \
        --warmup $((2 * $1 > 16 ? 2 * $1 : 16)) --jitter-ms ${JITTER_MS:-0} $EXTRA --json $R/bench_c$1_$mode.json $([ $mode = stream ] && echo --stream) \
        > $R/bench_c$1_$mode.txt 2> $R/bench_c$1_$mode.log
      log "c=$1 $mode rc=$? in $(el $T) s"; cat $R/bench_c$1_$mode.txt
    done
  done
  if [ -n "${JITTER_ALL_SET:-}" ]; then  # "C REQUESTS TOKENS ROUNDS": plain, every target's sends paused 0-JITTER_MS ms
    set -- $JITTER_ALL_SET; T=$(now)
    python3 benchmarks/bench_gateway.py --engine-url $E7 --gateway-url $G7 --base $BIG_NAME --adapters $HOT \
      --assignment round-robin --concurrency $1 --requests $2 --max-tokens $3 --prompt-words 150 --rounds $4 \
      --warmup $((2 * $1 > 16 ? 2 * $1 : 16)) --jitter-ms ${JITTER_MS:-10} --jitter-all $EXTRA \
      --json $R/bench_c$1_plain_jittered.json > $R/bench_c$1_plain_jittered.txt 2> $R/bench_c$1_plain_jittered.log
    log "c=$1 plain, all jittered, rc=$? in $(el $T) s"; cat $R/bench_c$1_plain_jittered.txt
  fi
  kill $CS 2>/dev/null
fi

# 5. cold adapters: vLLM's own load + first token, against the gateway's first token
if [[ " $STEPS " == *" cold "* ]]; then
  python3 benchmarks/gpu/cold_load.py --engine-url $E7 --gateway-url $G7 --json $R/cold.json \
    --direct-dirs $(for i in $(seq 16 23); do echo -n "$HOME/loras/lora$i,"; done) \
    --cold $(for i in $(seq 0 7); do echo -n "cold$i,"; done) > $R/cold.txt 2>&1
  cat $R/cold.txt
fi

# 6. short requests over the 1B engine: one worker against four
if [[ " $STEPS " == *" small "* ]]; then
  SMALLS=$(for i in $(seq 0 7); do echo -n "small$i,"; done); SMALLS=${SMALLS%,}
  G4P=$(gateway 8204 $E1 $SMALL_NAME $HOME/reg1 4 $R/gateway1b_x4.log)
  G1P=$(gateway 8201 $E1 $SMALL_NAME $HOME/reg1 1 $R/gateway1b_x1.log)
  log "gateways over the 1B engine ready (x4 pid $G4P, x1 pid $G1P)"
  python3 benchmarks/gpu/short_requests.py --engine-url $E1 --base $SMALL_NAME --adapters $SMALLS --burst \
    --target gateway-x4=$G4:$G4P --target gateway-x1=$G1:$G1P --rounds ${SHORT_ROUNDS:-2} --duration 5 \
    > $R/short.txt 2> $R/short.log
  cat $R/short.txt; tail -3 $R/short.log
  kill $G4P $G1P 2>/dev/null
fi

# 7. the gateway's own cost on this host's CPUs (instant upstream), 1 vs 4 workers
if [[ " $STEPS " == *" cpu "* ]]; then
  python3 benchmarks/bench_dataplane.py --no-adapter-row --workers 4 --modes plain --levels 256 --wrk-threads 8 \
    --duration 3 --rounds 1 --json $R/dataplane.json > $R/dataplane.txt 2> $R/dataplane.log
  cat $R/dataplane.txt; tail -3 $R/dataplane.log
fi

# 8. placement over four 3B engines, measured by the next call (placement.sh run); the 7B engine makes room first
if [[ " $STEPS " == *" place "* ]]; then
  while [ ! -f $R/b3_end ]; do sleep 2; done
  grep -q SMALL_DONE $R/b3.log || { tail -30 $R/b3.log; fail "3B MODEL FAILED"; }
  [ -n "$GP" ] && kill $GP 2>/dev/null
  kill -TERM -- -$S7 2>/dev/null; for i in $(seq 1 60); do kill -0 $S7 2>/dev/null || break; sleep 1; done; sleep 5
  bash $REPO/benchmarks/gpu/placement.sh start $L
fi

{ echo "vLLM $(python3 -c 'import vllm; print(vllm.__version__)'), $(nvidia-smi --query-gpu=name,memory.used --format=csv,noheader), $(nproc) CPUs"
  for f in $R/bench_c*_*.txt $R/cold.txt $R/short.txt $R/dataplane.txt; do [ -f $f ] && { echo "== $(basename $f)"; cat $f; echo; }; done
  for f in $R/cpu_gateway7.txt; do [ -s $f ] && python3 -c "
import statistics
v = sorted(int(l.split()[1]) for l in open('$f') if l.strip())
busy = [x for x in v if x >= 5] or [0]
print('gateway CPU while busy: median', statistics.median(busy), '% of a core, p90', busy[int(0.9 * (len(busy) - 1))], '%, max', v[-1], '%')"; done
  grep -hE "WARNING|ERROR" $R/gateway*.log | head -20
} > $R/summary.txt
cat $R/summary.txt
log "ALL DONE at $(el $START) s"
echo OK > $R/DONE
