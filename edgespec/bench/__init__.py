"""`edgespec bench`: Spec-Bench prompts through the engine's decoding modes and through peer runtimes.

Every system generates greedily, batch 1, from the same chat-templated prompt token ids, with the same thread count,
for exactly `--max-new-tokens` tokens (EOS never stops anyone: `ignore_eos=True` for the engine, no EOS id plus
`min_new_tokens` for transformers, a token counter for llama.cpp), so the rates are comparable.

Systems
* modes (`--mode plain,...`): decoding strategies of the engine, registered in `MODES` (see `modes`). A mode is a
  function `(system, prompt_text, gen_config) -> (token_ids, stats)` where `system` is a `BenchSystem` (the engine
  and the bench's state about it) and `stats` has GenerationStats' keys. `plain` is the baseline of every ratio.
  Later modes register themselves with `@register_mode("name")`; a mode that cannot run on a bundle (no drafter,
  say) raises `ModeUnavailable` and is reported as skipped.
* peers (`--peers hf,llama.cpp,optimum`, see `peers`): Hugging Face transformers `generate` (torch CPU, float32) on
  the bundle's source weights, llama.cpp through llama-cpp-python on the source GGUF, and optimum-onnx's
  ORTModelForCausalLM on an int4 ONNX export of the source made in its own environment by tools/optimum_peer/setup.sh
  (optional ones are skipped, with the reason, when not installed).

Each system runs in its own fresh subprocess (`python -m edgespec.bench --worker JOB --result OUT`), so its peak RSS
and its threads are its own. Rates: end-to-end tokens/s = new tokens / total seconds (prefill included), decode
tokens/s = (new tokens - 1) / (total - time to first token); per category the medians over prompts; overall both
the aggregate (sum of tokens / sum of seconds) and the median. The summary functions are small and pure, over
lists of row dicts.

The parts, by job:
* `dataset`: Spec-Bench questions (reading, choosing by category);
* `modes`: the mode registry, the systems it expands to (`mode@tree~device`), `BenchSystem`, the modes;
* `peers`: one module per peer runtime (`hf`, `llamacpp`, `optimum`);
* `summary`: rows and their summaries (pure);
* `report`: tables, Markdown, the console tables, progress lines;
* `machine`: machine info and memory;
* `run`: the jobs a worker runs (a mode, the modes interleaved, a peer), the worker processes, `run_bench`;
* `cli`: the options of `edgespec bench` and its command.
"""

from __future__ import annotations

from .cli import MAX_DRAFT_BUDGET, MAX_QUESTIONS, MAX_WARMUP, add_arguments, main
from .dataset import DEFAULT_DATA, REPO_ROOT, load_spec_bench, read_spec_bench, select_questions
from .machine import current_rss_mb, load_average, machine_info, peak_rss_mb, reset_peak_rss
from .modes import BASELINE, MODES, WARMUP_TOKENS, BenchSystem, ModeFn, ModeUnavailable, bench_gen_config, \
    expand_modes, ngram_mode, plain_mode, register_mode, split_system
from .peers import PEERS, PeerUnavailable, run_hf_job, run_llama_cpp_job
from .report import category_table, cross_evaluation_table, drafter_details, planner_table, print_tables, \
    render_markdown, system_notes, systems_table
from .run import JOBS, RESULT_FORMAT, RESULT_VERSION, prepare_device, run_bench, run_interleaved_job, run_job, \
    run_mode_job, run_subprocess
from .summary import add_agreement, add_ratios, common_prefix, make_row, paired_speed, ratio, speculation_summary, \
    summarize, summarize_rows

__all__ = [
    "BASELINE", "DEFAULT_DATA", "JOBS", "MAX_DRAFT_BUDGET", "MAX_QUESTIONS", "MAX_WARMUP", "MODES", "PEERS",
    "REPO_ROOT", "RESULT_FORMAT", "RESULT_VERSION", "WARMUP_TOKENS", "BenchSystem", "ModeFn", "ModeUnavailable",
    "PeerUnavailable", "add_agreement", "add_arguments", "add_ratios", "bench_gen_config", "category_table",
    "common_prefix", "cross_evaluation_table", "current_rss_mb", "drafter_details", "expand_modes", "load_average",
    "load_spec_bench", "machine_info", "main", "make_row", "ngram_mode", "paired_speed", "peak_rss_mb",
    "plain_mode", "planner_table", "prepare_device", "print_tables", "ratio", "read_spec_bench", "register_mode",
    "render_markdown", "reset_peak_rss", "run_bench", "run_hf_job", "run_interleaved_job", "run_job",
    "run_llama_cpp_job", "run_mode_job", "run_subprocess", "select_questions", "speculation_summary", "split_system",
    "summarize", "summarize_rows", "system_notes", "systems_table",
]
