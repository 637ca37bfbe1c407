# sample_fid.py at the session's start (0bc773a) and now, 4096 images of a random AiM-B, batch 256, bf16
mkdir -p .exp/s18old && git archive 0bc773a src scripts/sample_fid.py | tar -x -C .exp/s18old
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -m pip install --no-deps -q .wheels/*.whl 2>&1 | tail -1
PYTHONPATH=$PWD/src python benchmarks/2026-11-27-s18-make-random-pipeline.py /tmp/pipe-b AiM-B > /dev/null 2>&1
for v in after before after; do
  if [ $v = before ]; then R=$PWD/.exp/s18old; else R=$PWD; fi
  rm -rf /tmp/s-$v
  T=$(date +%s.%N)
  PYTHONPATH=$R/src python $R/scripts/sample_fid.py --model /tmp/pipe-b --output /tmp/s-$v/samples --num-images 4096 --batch-size 256 --dtype bfloat16 > /tmp/$v.log 2>&1 || { echo FAILED $v; tail -5 /tmp/$v.log; }
  echo "$v: $(python -c "print(round($(date +%s.%N) - $T, 1))") s for 4096 images, $(ls /tmp/s-$v/samples | wc -l) files"
done
cmp /tmp/s-before/samples.npz /tmp/s-after/samples.npz && echo "npz identical"
