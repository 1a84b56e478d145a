#!/bin/bash
# After the kit's call 3 (`bash .gpu/scripts/callpart.sh 3 && bash benchmarks/gpu/small_model.sh`): build the
# 1B-shaped model and its 8 adapters in the background (setsid: it outlives the call); run_all.sh waits for it.
mkdir -p $HOME/res; rm -f $HOME/res/small_end; cp benchmarks/gpu/make_small.py $HOME/make_small.py
setsid nohup bash -c 'python3 $HOME/make_small.py $HOME/models/llama1b-rand $HOME/tok $HOME/loras1b 8; date +%s.%N > $HOME/res/small_end' \
  > $HOME/res/small.log 2>&1 < /dev/null &
sleep 1; echo "small model build started"; cat $HOME/res/prep.log
