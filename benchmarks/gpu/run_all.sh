#!/bin/bash
# Gateway overhead on a lent GPU, with the kit in ../shared/gpu (README there): its calls 1-3 as they are, then
#   call 4: cp benchmarks/gpu/run_all.sh .gpu/scripts/ && bash .gpu/scripts/calllast.sh 4 570   (timeout_s 600)
# (carry .gpu/p4 and .gpu/scripts). calllast.sh starts this script with setsid from the repository root and packs
# $HOME/res into $OUT when it writes DONE. Steps: install vLLM from the parts -> wait for the random 7B-shaped
# model and its adapters (call 1 started them) -> register the base and 8 adapters in a local registry while vLLM
# starts with --enable-lora -> gateway_overhead.sh (gateway in external mode, bench_gateway.py plain and streamed).
# On a machine still warm (30 s after a call): cp benchmarks/gpu/run_all.sh .gpu/scripts/ && bash .gpu/scripts/rerun.sh
# (carry .gpu/scripts). Knobs (environment): ADAPTER_COUNT, KEEP_ALIVE_S, and gateway_overhead.sh's MODES, REQUESTS,
# CONCURRENCY, MAX_TOKENS, PROMPT_WORDS, ROUNDS, WARMUP.
R=$HOME/res; mkdir -p $R
MODEL=$HOME/models/llama7b-rand; NAME=llama7b-rand; PORT=8000; B=http://127.0.0.1:$PORT
ADAPTER_COUNT=${ADAPTER_COUNT:-8}
now() { date +%s.%N; }
el() { python3 -c "print(f'{$(now)-$1:.1f}')"; }
log() { echo "[$(date +%T)] $*"; }
START=$(now)
export VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
export PYTHONUNBUFFERED=1
# our code, copied out of the repository copy that the next call replaces
L=$HOME/lg; rm -rf $L; mkdir -p $L; cp -r gateway adapters_registry loragate training benchmarks $L/ || exit 1

# 1. install: reassemble the parts, extract the pip --target tree (once per machine)
T=$(now)
if [ ! -f $HOME/site/vllm/__init__.py ]; then
  cat $HOME/parts/stage.tar.xz.part* > $HOME/stage.tar.xz && rm -rf $HOME/site && mkdir -p $HOME/site
  xz -T0 -dc $HOME/stage.tar.xz | tar -C $HOME/site -xf -
fi
log "install took $(el $T) s"
export PYTHONPATH=$HOME/site
python3 -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__, torch.cuda.get_device_name(0))" \
  || { log "IMPORT FAILED"; echo FAILED > $R/DONE; exit 1; }

# 2. wait for the model and adapters (make_model.py, started in call 1)
while [ ! -f $R/prep_end ]; do sleep 2; done
grep -q PREP_DONE $R/prep.log || { log "PREP FAILED"; tail -30 $R/prep.log; echo FAILED > $R/DONE; exit 1; }
ADAPTER_DIRS=$(for i in $(seq 0 $((ADAPTER_COUNT - 1))); do echo -n "$HOME/loras/lora$i "; done)
ADAPTERS=$(for i in $(seq 0 $((ADAPTER_COUNT - 1))); do echo -n "lora$i,"; done)

# 3. registry (in the background) and the vLLM server; no static adapters: the gateway loads them at run time.
# vLLM keeps its default keep-alive (5 s): the gateway drops idle engine connections after 2 s (upstream.keepalive_s),
# so it never reuses one vLLM is closing. (Before that setting existed, it did, and answered 503s: README.)
rm -rf $HOME/reg
PYTHONPATH=$L:$PYTHONPATH python3 $L/benchmarks/gpu/register.py $HOME/reg $MODEL $NAME $ADAPTER_DIRS \
  > $R/register.log 2>&1 & RPID=$!
T=$(now)
VLLM_HTTP_TIMEOUT_KEEP_ALIVE=${KEEP_ALIVE_S:-5} VLLM_ALLOW_RUNTIME_LORA_UPDATING=True setsid python3 -m vllm.entrypoints.openai.api_server \
  --model $MODEL --served-model-name $NAME --dtype bfloat16 --max-model-len 2048 --port $PORT \
  --enable-lora --max-lora-rank 16 --max-loras $ADAPTER_COUNT --max-cpu-loras $((2 * ADAPTER_COUNT)) \
  --disable-uvicorn-access-log > $R/server_lora.log 2>&1 < /dev/null &
SPID=$!
healthy=0
for i in $(seq 1 400); do
  python3 -c "import sys, urllib.request; urllib.request.urlopen('$B/health', timeout=2)" 2>/dev/null && { healthy=1; break; }
  kill -0 $SPID 2>/dev/null || break
  sleep 1
done
[ $healthy = 1 ] || { log "SERVER NOT HEALTHY"; tail -60 $R/server_lora.log; echo FAILED > $R/DONE; exit 1; }
log "vLLM healthy after $(el $T) s"
wait $RPID || { log "REGISTER FAILED"; cat $R/register.log; echo FAILED > $R/DONE; exit 1; }
cat $R/register.log

# 4. gateway + benchmarks
ENGINE_URL=$B ENGINE_PID=$SPID REG=$HOME/reg BASE=$NAME ADAPTERS=${ADAPTERS%,} R=$R \
  bash $L/benchmarks/gpu/gateway_overhead.sh
{ echo "vLLM $(python3 -c 'import vllm; print(vllm.__version__)'), $(nvidia-smi --query-gpu=name,memory.used --format=csv,noheader)"
  for f in $R/bench_plain.txt $R/bench_stream.txt; do [ -f $f ] && { cat $f; echo; }; done; } > $R/summary.txt

# 5. stop vLLM (its whole process group)
kill -TERM -- -$SPID 2>/dev/null; for i in $(seq 1 20); do kill -0 $SPID 2>/dev/null || break; sleep 1; done
kill -KILL -- -$SPID 2>/dev/null
log "ALL DONE at $(el $START) s"
echo OK > $R/DONE
