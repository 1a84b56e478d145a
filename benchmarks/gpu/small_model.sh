#!/bin/bash
# After the kit's call 3 (`bash .gpu/scripts/callpart.sh 3 && bash benchmarks/gpu/small_model.sh [1b] [3b]`): build
# the 1B-shaped model and its 8 adapters and/or the 3B-shaped one and its 64 (placement.sh) in the background
# (setsid: it outlives the call); run_all.sh waits for what its STEPS need.
mkdir -p $HOME/res; cp benchmarks/gpu/make_small.py $HOME/make_small.py
for shape in ${@:-1b}; do
  if [ $shape = 3b ]; then
    rm -f $HOME/res/b3_end
    setsid nohup bash -c 'python3 $HOME/make_small.py $HOME/models/llama3b-rand $HOME/tok $HOME/loras3b 64 3b; date +%s.%N > $HOME/res/b3_end' \
      > $HOME/res/b3.log 2>&1 < /dev/null &
  else
    rm -f $HOME/res/small_end
    setsid nohup bash -c 'python3 $HOME/make_small.py $HOME/models/llama1b-rand $HOME/tok $HOME/loras1b 8; date +%s.%N > $HOME/res/small_end' \
      > $HOME/res/small.log 2>&1 < /dev/null &
  fi
done
sleep 1; echo "model builds started: ${@:-1b}"; cat $HOME/res/prep.log
