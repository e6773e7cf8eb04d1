#!/usr/bin/env bash
# Every GPU figure issue 5 asks for, in one call on a GPU machine, most important first, each
# result written to $OUT as soon as it exists, all inside a time budget (a device call is limited).
#
#   here:        bash ../shared/scripts/gpu-site.sh pytest==9.0.3 pluggy==1.6.0 iniconfig==2.3.0 pygments
#   on the GPU:  OUT=/some/dir bash scripts/gpu_measure.sh [seconds, default 520]   (carry .devsite)
#
# 1. the CUDA-graph decode test (graph replay vs eager logits, recapture after rows leave);
# 2. grpo vs TRL 1.16, the issue's configuration (Qwen2.5-0.5B shape, 8 prompts x G=8, 83 prompt
#    tokens, 256 new tokens, kl_beta 0.04, LoRA r16, gradient checkpointing);
# 3. grpo alone without CUDA graphs, same settings (what the graphs are worth);
# 4. the same with an nf4 base, grpo vs TRL;
# 5. the scaling table (G, completion length and model size doubled).
# Short runs (1 warm-up, 3 timed steps, one round) so that all of it fits; rerun a part with more
# steps where time allows.
set -u
out=${OUT:?set OUT to the folder for the results}
budget=${1:-520}
deadline=$(( $(date +%s) + budget ))
export PYTHONPATH=$PWD/.devsite:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
report=$out/gpu.md
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)'
  date -u; } > "$report" 2>&1

part() {  # part NAME COMMAND...: runs it with the time left, appends its output to the report
  local name=$1; shift
  local left=$(( deadline - $(date +%s) ))
  if [ "$left" -lt 40 ]; then echo -e "\n## $name: skipped, ${left}s left" >> "$report"; return; fi
  local started=$(date +%s)
  timeout "$left" "$@" > "$out/$name.txt" 2> "$out/$name.err"
  local rc=$?
  echo -e "\n## $name (exit $rc, $(( $(date +%s) - started )) s)\n" >> "$report"
  cat "$out/$name.txt" >> "$report"
  [ "$rc" -ne 0 ] && tail -n 30 "$out/$name.err" >> "$report"
}

issue=(--shape qwen2.5-0.5b --prompts 8 --group-size 8 --max-new-tokens 256 --prompt-tokens 83 --gradient-checkpointing
       --rounds 1 --warmup 1 --steps 3)
part cuda-graph-test python -m pytest -q -p no:cacheprovider tests/test_decoder.py -k cuda
part bench-0.5b python scripts/bench.py "${issue[@]}" --json "$out/bench-0.5b.json"
part bench-0.5b-no-graphs python scripts/bench.py "${issue[@]}" --only ours --no-cuda-graphs
part bench-0.5b-nf4 python scripts/bench.py "${issue[@]}" --load-in-4bit --json "$out/bench-0.5b-nf4.json"
part scaling python scripts/scaling.py --shape qwen2.5-0.5b --prompts 8 --group-size 8 --max-new-tokens 256 \
  --prompt-tokens 83 --steps 3
cat "$report"
