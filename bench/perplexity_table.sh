#!/bin/bash
# The KV-cache table of docs/models.md: qkv perplexity of SmolLM2-135M-Instruct
# over Debian's GPL-3 text (8 chunks of 512 tokens) for each cache dtype and
# for sliding windows with and without attention sinks. ~15 minutes on one
# core (window and sinks caches run prompts one token at a time).
#   bench/perplexity_table.sh [path/to/qkv] [path/to/model.gguf]
set -euo pipefail
QKV=${1:-build/release/qkv}
MODEL=${2:-models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
TEXT=/usr/share/common-licenses/GPL-3
for args in "" "--cache-dtype f16" "--cache-dtype bf16" "--cache-dtype i8" \
    "--cache paged --cache-dtype i8" "--cache sliding --cache-window 256" \
    "--cache sinks --cache-window 252 --sinks 4" "--cache sliding --cache-window 64" \
    "--cache sinks --cache-window 60 --sinks 4"; do
  # shellcheck disable=SC2086
  "$QKV" perplexity --model "$MODEL" --input "$TEXT" --context 512 --chunks 8 --threads 1 $args
done
