#!/usr/bin/env bash
# The next device session's calls for issue 13 (the engine and the edge benchmarks), in order. Written 2026-12-05
# (session 11), before any GPU run of sessions 10-11's code: SHARE_WEIGHTS (dense and w4a16), the FR-Spec fallback to
# plain steps, the draft window. Predictions: kernels/NOTES_engine.md, "Session 10" and "Session 11". This file is
# tracked so that it outlives the session (session 10's copies lived in an ignored folder and were lost with it).
#
# Prepare on the CPU machine, once, in the repo root (the GPU image has no network and no fastcore):
#   printf '/.whl/\n/.snap/\n' >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl fastcore==2.2.41
#   mkdir -p .snap/corpora && cp -r ~/.cache/minicpm4_core/corpora/austen .snap/corpora/   # `data_recipes/real_corpora.py`
# Each `run` call: carry=[".whl", ".snap"], command `bash kernels/device_plan.sh STAGE` (timeout_s 600), and read
# $OUT/STAGE.tgz (one file: the 8-file limit of what comes back).
#   a  (~460 s) check_engine: agreement (fp32 + bf16), the session-7 stages (fallback) and session 11's (the shared
#      dense / w4a16 weights, W4A16 kernels on column views, memory_plan vs allocated) FIRST - SHARE_WEIGHTS changed
#      the weight storage of every static path on CUDA; then the 0.5B transformers + torch.compile row beside our
#      engine at 4K, the 0.5B 32K InfLLM v2 chunked prefill against session 8's 0.862 s (host or code?), and the tree
#      selection's new default ('triton-default' should equal 'triton-cand' at 2,048 blocks, 'triton' below).
#   b  (~580 s) the whole edge notebook (the table, figures, goal lines).
#   c  (optional, ~320 s) the trained pair's long rows (32K) with the fallback, draft window 0 and 256.
#   d  (optional, ~300-400 s) acceptance vs context on the edge run's own 0.5B pair (kernels/spec_accept_vs_context.py).
set -uo pipefail
stage=${1:?usage: bash kernels/device_plan.sh a|b|c|d}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MINICPM4_DATA=$PWD/.snap/corpora
o=$OUT/$stage; mkdir -p "$o"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$o/gpu.txt" 2>&1
case $stage in
a)
  timeout 230 python kernels/check_engine.py --parts agreement,session7,session11 --out "$o/check_engine.json" 2>&1 | tee "$o/check.log"
  timeout 125 python -m minicpm4_core.edge_bench --profile edge --out "$o/hf" --parts decode --shapes minicpm4_0_5b \
    --configs engine-dense,generate,hf-compile --contexts 4096 --batches 1 --budget 110 \
    --set "grid='engine-dense=4096/1;generate=4096/1;hf-compile=4096/1'" 2>&1 | tee "$o/hf.log"
  timeout 60 python kernels/bench_sparse_model.py --chunked minicpm4_0_5b:32768:24:all --chunk 2048 --budget 55 \
    --out "$o/prefill" 2>&1 | tee "$o/prefill.log"
  timeout 60 python kernels/bench_tree_attention.py --out "$o/sel.json" --stages select:0.5b,select:8b --budget 55 \
    2>&1 | tee "$o/sel.log" ;;
b)
  EDGE_OUT=$o/edge timeout 578 python kernels/run_edge_notebook.py --profile edge 2>&1 | tee "$o/notebook_log.txt" ;;
c)
  timeout 560 python -m minicpm4_core.edge_bench --profile edge --out "$o/long" --parts spec --shapes minicpm4_0_5b \
    --spec "long_contexts=32768,long_draft_windows=0,256,long_bf16=False" --budget 540 2>&1 | tee "$o/long.log" ;;
d)
  timeout 560 python kernels/spec_accept_vs_context.py --edge --contexts 16384,32768 --chunk 2048 \
    --out "$o/accept_vs_context.json" 2>&1 | tee "$o/accept.log" ;;
*) echo "unknown stage $stage (a|b|c|d)"; exit 2 ;;
esac
rc=$?
tar czf "$OUT/$stage.tgz" -C "$OUT" "$stage" && rm -rf "$o"
exit $rc
