#!/bin/bash
. /work/venv/bin/activate
for i in 1 2; do
  for v in old new; do
    if [ $v = old ]; then d=/tmp/speed/old_tree; else d=/work/wt/speed; fi
    cd $d && echo "== $v $(date -u +%T) $(uptime | sed 's/.*load/load/')" && PYTHONPATH=$d OMP_NUM_THREADS=1 python benchmarks/bench_teacher_cache.py --rounds 3 --steps 2 | grep distill
  done
done
