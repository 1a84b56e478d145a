#!/bin/bash
# Placement over four engines on one lent GPU (README "Many adapters over many engines", issue 17), after
# run_all.sh with STEPS containing "place": that step calls `placement.sh start` once the 7B engine is gone, which
# starts four vLLM engines of a 3B-shaped model (--max-loras 4 --max-cpu-loras 16, vLLM's lora_filesystem_resolver
# over 64 adapters, so a round-robin target loads on demand) and registers the 64 adapters, all in the background
# (setsid: they outlive the call). The next call (timeout_s 600, carry .gpu/scripts):
#   bash benchmarks/gpu/placement.sh run
# waits for them, times loads idle and busy (--load-timing LOAD_TIMING), runs bench_placement.py in this order
# (gateway-v2, gateway-v2-again as the noise row, round-robin last, since a round-robin run that was cut leaves the
# engines stalled behind loads; each run starts on idle, emptied engines; 128 clients, Zipf 1.1; each run at most
# DURATION s, cut DRAIN s later) and
# leaves placement${TAG}_all.tgz in $OUT (placement.json, .txt, .log, the gateways' and the engines' logs).
R=$HOME/res; MODEL=$HOME/models/llama3b-rand; NAME=llama3b-rand; LORAS=$HOME/loras3b; REG=$HOME/reg3b
PORTS="8300 8301 8302 8303"
export VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
export PYTHONUNBUFFERED=1 VLLM_ALLOW_RUNTIME_LORA_UPDATING=True
log() { echo "[$(date +%T)] $*"; }
case $1 in
start)
  export PYTHONPATH=$HOME/site
  for p in $PORTS; do
    VLLM_PLUGINS=lora_filesystem_resolver VLLM_LORA_RESOLVER_CACHE_DIR=$LORAS setsid python3 -m \
      vllm.entrypoints.openai.api_server --model $MODEL --served-model-name $NAME --dtype bfloat16 \
      --max-model-len 2048 --port $p --enable-lora --max-lora-rank 16 --max-loras 4 --max-cpu-loras 16 \
      --gpu-memory-utilization 0.15 --kv-cache-memory-bytes ${KV_BYTES:-8589934592} --disable-uvicorn-access-log \
      > $R/engine3b_$p.log 2>&1 < /dev/null &
  done
  rm -rf $REG; rm -f $R/register3b_end
  PYTHONPATH=$2:$HOME/site setsid bash -c "python3 $2/benchmarks/gpu/register.py $REG $MODEL $NAME $LORAS/p*; date > $R/register3b_end" \
    > $R/register3b.log 2>&1 < /dev/null &
  log "four 3B engines and the registry started" ;;
run)
  export PYTHONPATH=$PWD:$HOME/site
  T=$(date +%s)
  for p in $PORTS; do
    for i in $(seq 1 300); do
      python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$p/health', timeout=2)" 2>/dev/null && break
      sleep 1
    done
  done
  while [ ! -f $R/register3b_end ]; do sleep 1; done
  log "engines healthy, registry written $(( $(date +%s) - T )) s into this call"; tail -2 $R/register3b.log
  nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
  # PROBE=1: time a load's host-side steps idle and busy first (bench_placement.py --probe); CALIBRATE=1: the
  # simulator's costs on these engines first (--calibrate, at 1, 4, 16 and 32 requests per engine)
  EXTRA=""; [ "${PROBE:-0}" = 1 ] && EXTRA="$EXTRA --probe"
  [ "${CALIBRATE:-0}" = 1 ] && EXTRA="$EXTRA --calibrate --calibrate-batches 1,4,16,32"
  # PREWARM=1: every run starts warm (the gateway's adapters.prewarm; round-robin's engines hold the 16 most popular)
  [ "${PREWARM:-0}" = 1 ] && EXTRA="$EXTRA --prewarm"
  ARGS=""; for p in $PORTS; do ARGS="$ARGS --engine-url http://127.0.0.1:$p --engine-log $R/engine3b_$p.log"; done
  python3 benchmarks/bench_placement.py $ARGS --base $NAME --registry $REG --resolver $LORAS --max-lora-rank 16 \
    --adapters 64 --max-loras 4 --max-cpu-loras 16 --zipf 1.1 --base-share 0.05 --concurrency 128 \
    --requests 100000 --prompt-tokens 128 --max-tokens 64 --rounds ${ROUNDS:-1} --duration-s ${DURATION:-60} \
    --drain-s ${DRAIN:-20} --load-timing ${LOAD_TIMING:-4} --fixed-order $EXTRA \
    --targets ${TARGETS:-gateway-v2,gateway-v2-again,round-robin} \
    --work $HOME/pwork --json $OUT/placement${TAG:-}.json > $OUT/placement${TAG:-}.txt 2> $OUT/placement${TAG:-}.log
  log "bench_placement rc=$?"; cat $OUT/placement${TAG:-}.txt; tail -30 $OUT/placement${TAG:-}.log
  for p in $PORTS; do grep -E "ERROR|Traceback" $R/engine3b_$p.log | head -3; done
  # one file per invocation: the device returns only so many files from a call, and several invocations in one call
  # (one per target) otherwise lost the last ones' results
  (cd $HOME/pwork 2>/dev/null && tar czf $OUT/pwork_logs${TAG:-}.tgz *.log 2>/dev/null)
  (cd $R && tar czf $OUT/engines3b_logs${TAG:-}.tgz engine3b_*.log register3b.log b3.log 2>/dev/null)
  cd $OUT && F="placement${TAG:-}.json placement${TAG:-}.txt placement${TAG:-}.log pwork_logs${TAG:-}.tgz engines3b_logs${TAG:-}.tgz" \
    && tar czf placement${TAG:-}_all.tgz $F 2>/dev/null && rm -f $F ;;
*) echo "usage: placement.sh start REPO | run"; exit 2 ;;
esac
