# sample_fid.py before and after 308200a, alternating (bash benchmarks/2026-11-27-s18-sample-fid-png-threads.sh)
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -m pip install --no-deps -q .wheels/*.whl 2>&1 | tail -1
export PYTHONPATH=$PWD/src
git show 308200a~:scripts/sample_fid.py > .exp/sample_fid_before.py  # sample_fid.py before the PNG threads
nproc
python benchmarks/2026-11-27-s18-make-random-pipeline.py /tmp/pipe-b AiM-B 2>&1 | grep -v "kept in float32"
for v in before after before after; do
  if [ $v = before ]; then S=.exp/sample_fid_before.py; else S=scripts/sample_fid.py; fi
  rm -rf /tmp/s-$v /tmp/s-$v.npz
  T=$(date +%s.%N)
  python $S --model /tmp/pipe-b --output /tmp/s-$v/samples --num-images 1024 --batch-size 256 --dtype bfloat16 > /dev/null 2>&1 || echo FAILED $v
  echo "$v: $(python -c "print(round($(date +%s.%N) - $T, 1))") s for 1024 images, $(ls /tmp/s-$v/samples | wc -l) files"
done
cmp /tmp/s-before/samples.npz /tmp/s-after/samples.npz && echo "npz identical"
