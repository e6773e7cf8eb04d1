#!/usr/bin/env bash
# Every GPU figure of docs/performance.md, in one call on a GPU machine, most important first, each
# result written as soon as it exists, all inside a time budget (a device call is limited). $OUT gets
# at most 8 files (a device call returns no more): gpu.md (every part's output), the bench JSONs and
# the quickstart's metrics; each part's full output stays in a scratch folder on the machine.
#
#   here:        bash ../shared/scripts/gpu-site.sh pytest==9.0.3 pluggy==1.6.0 iniconfig==2.3.0 pygments
#                cp -r "$GRPO_CACHE" .grpo-cache     # the built builtin models (tiny-math, tiny-math-tools), for the quickstart and tool parts (else skipped)
#   on the GPU:  OUT=/some/dir bash scripts/gpu_measure.sh [seconds, default 520]   (carry .devsite, .grpo-cache)
#
# 1. the CUDA-graph decode test (graph replay vs eager logits, recapture after rows leave);
#    then the sampler/trainer mismatch: the quickstart in float32 and bfloat16, CUDA graphs on and off, 20 steps each;
# 2. grpo vs TRL 1.16, the GPU bench's configuration (Qwen2.5-0.5B shape, 8 prompts x G=8, 83 prompt
#    tokens, 256 new tokens, kl_beta 0.04, LoRA r16, gradient checkpointing);
# 3. grpo alone without CUDA graphs, same settings (what the graphs are worth);
# 4. the same with an nf4 base, grpo vs TRL;
# 5. the scaling table (G, completion length and model size doubled);
# 6. the quickstart recipe (builtin model) on the GPU: held-out accuracy and step time;
# 7. long completions, 1024 and 2048 new tokens, grpo vs TRL: step time, tokens/s, peak memory;
# 8. train.deterministic false against the default true.
# Short runs (1 warm-up, 3 timed steps, one round) so that all of it fits; rerun a part with more
# steps where time allows.
set -u
out=${OUT:?set OUT to the folder for the results}
budget=${1:-520}
deadline=$(( $(date +%s) + budget ))
export PYTHONPATH=$PWD/.devsite:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
report=$out/gpu.md
scratch=$(mktemp -d)
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)'
  date -u; } > "$report" 2>&1

part() {  # part NAME COMMAND...: runs it with the time left, appends its output to the report
  local name=$1; shift
  local left=$(( deadline - $(date +%s) ))
  if [ "$left" -lt 40 ]; then echo -e "\n## $name: skipped, ${left}s left" >> "$report"; return; fi
  local started=$(date +%s)
  timeout "$left" "$@" > "$scratch/$name.txt" 2> "$scratch/$name.err"
  local rc=$?
  echo -e "\n## $name (exit $rc, $(( $(date +%s) - started )) s)\n" >> "$report"
  cat "$scratch/$name.txt" >> "$report"
  [ "$rc" -ne 0 ] && tail -n 30 "$scratch/$name.err" >> "$report"
}

gpu_bench=(--shape qwen2.5-0.5b --prompts 8 --group-size 8 --max-new-tokens 256 --prompt-tokens 83 --gradient-checkpointing
           --rounds 1 --warmup 1 --steps 3)
part cuda-graph-test python -m pytest -q -p no:cacheprovider tests/test_decoder.py -k cuda
if [ -d .grpo-cache ]; then
  # sampler vs trainer (docs/algorithm.md): the builtin model's quickstart, float32 and bfloat16, graphs on and off
  part sampler-mismatch env GRPO_CACHE=$PWD/.grpo-cache python scripts/sampler_mismatch.py quickstart --steps 20 \
    --dtype float32 bfloat16 --graphs on off --set data.eval=null --out "$scratch/mismatch" \
    --json "$out/sampler-mismatch.json"
fi
part bench-0.5b python scripts/bench.py "${gpu_bench[@]}" --json "$out/bench-0.5b.json"
part bench-0.5b-no-graphs python scripts/bench.py "${gpu_bench[@]}" --only ours --no-cuda-graphs
part bench-0.5b-nf4 python scripts/bench.py "${gpu_bench[@]}" --load-in-4bit --json "$out/bench-0.5b-nf4.json"
part scaling python scripts/scaling.py --shape qwen2.5-0.5b --prompts 8 --group-size 8 --max-new-tokens 256 \
  --prompt-tokens 83 --steps 3
if [ -d .grpo-cache ]; then
  part quickstart env GRPO_CACHE=$PWD/.grpo-cache python -m grpo_cli train quickstart --set output.dir="$scratch/quickstart"
  cp "$scratch/quickstart/metrics.jsonl" "$out/quickstart-metrics.jsonl" 2>/dev/null
  # the code tool on a GPU: the lean decoder's CUDA graphs with rows paused and outputs appended
  part tool-cost env GRPO_CACHE=$PWD/.grpo-cache python scripts/tool_cost.py --device cuda --repeats 3
  part tool-tests env GRPO_CACHE=$PWD/.grpo-cache python -m pytest -q -p no:cacheprovider tests/test_tool_rollout.py
else
  echo -e "\n## quickstart: skipped, no .grpo-cache carried" >> "$report"
fi
long=(--shape qwen2.5-0.5b --prompts 8 --group-size 8 --prompt-tokens 83 --gradient-checkpointing --rounds 1 --warmup 1
      --steps 2)
part long-1024 python scripts/bench.py "${long[@]}" --max-new-tokens 1024 --json "$out/long-1024.json"
part long-2048 python scripts/bench.py "${long[@]}" --max-new-tokens 2048 --json "$out/long-2048.json"
part bench-0.5b-nondeterministic python scripts/bench.py "${gpu_bench[@]}" --only ours --nondeterministic
rm -rf "$scratch"
cat "$report"
