"""`staticmoe bench serve`: load generator against a running OpenAI-compatible server (ours or vLLM/SGLang).

    staticmoe bench serve --base-url http://127.0.0.1:8000 --model olmoe-1b-7b \\
        --input-len 512 --output-len 256 --sweep-concurrency 1,16,64,256 --time-limit-s 60 --result-dir results/

Streams /v1/completions with token-exact random prompts (or ShareGPT first exchanges) and `ignore_eos`, at a fixed
concurrency, a sweep of concurrencies, or a Poisson request rate. Prints a table, writes JSON, and for a sweep draws
throughput and latency PNGs. Exit status: 0 when every request succeeded, 1 when some failed, 2 for bad arguments.

`--dataset multi-turn` runs conversations instead (service/loadgen/multiturn.py): a shared system prompt, then turns
that each re-send the conversation so far, with TTFT reported per turn:

    staticmoe bench serve --base-url http://127.0.0.1:8000 --model olmoe-1b-7b --dataset multi-turn \
        --num-conversations 64 --num-turns 8 --system-prompt-len 2048 --input-len 128 --output-len 128
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import re
import sys
from pathlib import Path

from service.arg_types import positive_float, positive_int
from service.loadgen.client import run_level
from service.loadgen.dataset import (PromptSpec, load_sharegpt, model_vocab_size, random_token_prompts,
                                     tokenizer_for)
from service.loadgen.multiturn import make_conversations, run_conversations, summarize_turns, turns_table
from service.loadgen.processes import default_client_processes
from service.loadgen.report import plot_sweep, summarize, table

PROG = "staticmoe bench serve"


def json_object(text: str) -> dict:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {text!r}")
    return value


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers such as 1,16,64, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base-url", required=True, help="server root, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", help="model id sent in each request (the server's --served-model-name); also names "
                                   "the vocabulary of random prompts when it is a preset")
    p.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    data = p.add_argument_group("prompts")
    data.add_argument("--dataset", choices=["random", "sharegpt", "multi-turn"], default="random")
    data.add_argument("--dataset-path", help="ShareGPT-format JSON file (with --dataset sharegpt)")
    data.add_argument("--input-len", type=positive_int, default=512,
                      help="random: prompt tokens; multi-turn: new user tokens per turn")
    data.add_argument("--output-len", type=positive_int, default=256,
                      help="random, multi-turn: tokens generated per request (exactly: ignore_eos)")
    data.add_argument("--num-conversations", type=positive_int, default=64, help="multi-turn: conversations")
    data.add_argument("--num-turns", type=positive_int, default=8, help="multi-turn: requests per conversation")
    data.add_argument("--system-prompt-len", type=int, default=2048,
                      help="multi-turn: tokens of the system prompt every conversation starts with")
    data.add_argument("--sharegpt-output-len", type=positive_int,
                      help="sharegpt: generate this many tokens instead of the reply's length")
    data.add_argument("--vocab-size", type=positive_int, help="random: draw ids from [0, N) (default: the "
                                                              "vocabulary of --tokenizer, or of --model if a preset)")
    data.add_argument("--tokenizer", help="checkpoint directory or preset whose tokenizer counts ShareGPT tokens "
                                          "and whose vocabulary random prompts use (default: --model)")
    data.add_argument("--seed", type=int, default=0)
    load = p.add_argument_group("load")
    load.add_argument("--num-prompts", type=positive_int,
                      help="requests per level (default: max(2 x concurrency, 8); 100 without a concurrency)")
    load.add_argument("--max-concurrency", type=positive_int, help="requests in flight at most")
    load.add_argument("--sweep-concurrency", type=int_list, metavar="C1,C2,...",
                      help="run one level per concurrency and plot them")
    load.add_argument("--request-rate", type=positive_float, default=float("inf"),
                      help="Poisson arrivals per second (inf: all at once, bounded by the concurrency)")
    load.add_argument("--time-limit-s", type=positive_float,
                      help="per level: no new request starts after this; those in flight finish")
    load.add_argument("--num-warmups", type=int, default=0, help="short requests sent (and not counted) first")
    load.add_argument("--temperature", type=float, default=0.0)
    load.add_argument("--extra-body", type=json_object, metavar="JSON",
                      help='request fields added to every request, e.g. \'{"logprobs": 5}\' or '
                           '\'{"structured_outputs": {"regex": "[a-z ]{0,4096}"}}\' (the cost of a feature: same '
                           'load with and without)')
    load.add_argument("--request-timeout-s", type=positive_float, default=600.0)
    load.add_argument("--client-processes", type=positive_int, default=default_client_processes(),
                      help="client processes the requests are split over (default: a quarter of the cores, 1-8): "
                           "one process parsing every stream of a high concurrency adds its own delay to TTFT")
    out = p.add_argument_group("output")
    out.add_argument("--result-dir", default=".", help="where the JSON (and PNGs of a sweep) go")
    out.add_argument("--result-name", help="file stem (default: serve_<model>_<UTC time>)")
    out.add_argument("--no-plots", action="store_true", help="skip the PNGs of a sweep")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not re.match(r"^https?://[^/\s]+", args.base_url):
        parser.error(f"--base-url must look like http://HOST:PORT, got {args.base_url!r}")
    if args.max_concurrency and args.sweep_concurrency:
        parser.error("give either --max-concurrency or --sweep-concurrency, not both")
    if args.dataset == "sharegpt" and not args.dataset_path:
        parser.error("--dataset sharegpt needs --dataset-path FILE")
    if args.dataset_path and args.dataset != "sharegpt":
        parser.error("--dataset-path is only used with --dataset sharegpt")
    if args.dataset_path and not Path(args.dataset_path).is_file():
        parser.error(f"--dataset-path {args.dataset_path!r} is not a file")
    if args.num_warmups < 0:
        parser.error("--num-warmups must be >= 0")
    if args.temperature < 0:
        parser.error("--temperature must be >= 0")
    if args.dataset != "sharegpt" and not (args.vocab_size or args.tokenizer or args.model):
        parser.error("random prompts need a vocabulary: give --vocab-size, --tokenizer or a preset --model")
    if args.dataset == "multi-turn":
        if args.sweep_concurrency or args.num_prompts or args.time_limit_s or args.request_rate != float("inf"):
            parser.error("--dataset multi-turn takes --max-concurrency (conversations at once), not "
                         "--sweep-concurrency, --num-prompts, --time-limit-s or --request-rate")
        if args.system_prompt_len < 0:
            parser.error("--system-prompt-len must be >= 0")
    if args.dataset == "sharegpt" and not (args.tokenizer or args.model):
        parser.error("ShareGPT prompts need a tokenizer to count tokens: give --tokenizer")
    return args


def levels_of(args) -> list[int | None]:
    return args.sweep_concurrency or [args.max_concurrency]


def prompts_per_level(args, concurrency: int | None) -> int:
    if args.num_prompts:
        return args.num_prompts
    return max(2 * concurrency, 8) if concurrency else 100


def build_prompts(args, count: int) -> list[PromptSpec]:
    if args.dataset == "sharegpt":
        tokenizer = tokenizer_for(args.tokenizer or args.model)
        specs = load_sharegpt(args.dataset_path, count, tokenizer, args.seed, args.sharegpt_output_len)
        return [specs[i % len(specs)] for i in range(count)]  # a small file is cycled
    vocab = args.vocab_size or model_vocab_size(args.tokenizer or args.model)
    return random_token_prompts(count, args.input_len, args.output_len, vocab, args.seed)


async def run_all(args, specs: list[PromptSpec]) -> list[dict]:
    if args.num_warmups:
        warm = [PromptSpec(s.prompt, s.prompt_len, min(s.output_len, 8)) for s in specs[: args.num_warmups]]
        await run_level(args.base_url, warm, model=args.model, api_key=args.api_key,
                        max_concurrency=args.num_warmups, request_timeout_s=args.request_timeout_s)
    levels = []
    for concurrency in levels_of(args):
        run = await run_level(args.base_url, specs[: prompts_per_level(args, concurrency)], model=args.model,
                              api_key=args.api_key, max_concurrency=concurrency, request_rate=args.request_rate,
                              time_limit_s=args.time_limit_s, seed=args.seed, temperature=args.temperature,
                              request_timeout_s=args.request_timeout_s, extra_body=args.extra_body,
                              processes=args.client_processes)
        summary = summarize(run)
        levels.append(summary)
        print(f"concurrency {concurrency or '∞'}: {summary['completed']} ok, {summary['failed']} failed, "
              f"{summary['output_throughput']:.1f} output tok/s", flush=True)
        for message, count in summary["errors"].items():
            print(f"  {count} failed: {message}", file=sys.stderr, flush=True)
    return levels


def report_header(args, specs: list[PromptSpec]) -> dict:
    return {
        "benchmark": PROG,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "base_url": args.base_url,
        "model": args.model,
        "endpoint": "/v1/completions (stream, include_usage, ignore_eos)",
        "dataset": args.dataset,
        "dataset_path": args.dataset_path,
        "input_len": None if args.dataset == "sharegpt" else args.input_len,
        "output_len": args.sharegpt_output_len if args.dataset == "sharegpt" else args.output_len,
        "mean_prompt_len": sum(s.prompt_len for s in specs) / len(specs) if specs else None,
        "request_rate": None if math.isinf(args.request_rate) else args.request_rate,
        "time_limit_s": args.time_limit_s,
        "temperature": args.temperature,
        "extra_body": args.extra_body,
        "seed": args.seed,
    }


def multi_turn_main(args) -> tuple[dict, list[dict]]:
    """Runs the conversations; returns (report fields, levels) with the one level of all turns."""
    vocab = args.vocab_size or model_vocab_size(args.tokenizer or args.model)
    conversations = make_conversations(args.num_conversations, args.num_turns, args.system_prompt_len,
                                       args.input_len, args.output_len, vocab, args.seed)
    run = asyncio.run(run_conversations(args.base_url, conversations, model=args.model, api_key=args.api_key,
                                        max_concurrency=args.max_concurrency, temperature=args.temperature,
                                        request_timeout_s=args.request_timeout_s,
                                        processes=args.client_processes))
    summary = summarize_turns(run)
    print(turns_table(summary))
    fields = {"num_conversations": args.num_conversations, "num_turns": args.num_turns,
              "system_prompt_len": args.system_prompt_len}
    return fields, [summary]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.dataset == "multi-turn":
        try:
            fields, levels = multi_turn_main(args)
        except ValueError as err:
            print(f"{PROG}: error: {err}", file=sys.stderr)
            return 2
        return write_results(args, {**report_header(args, []), **fields}, levels)
    count = max(prompts_per_level(args, c) for c in levels_of(args))
    try:
        specs = build_prompts(args, count)
    except ValueError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    return write_results(args, report_header(args, specs), asyncio.run(run_all(args, specs)))


def write_results(args, header: dict, levels: list[dict]) -> int:
    report = {**header, "levels": levels}
    out_dir = Path(args.result_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = args.result_name or f"serve_{re.sub(r'[^A-Za-z0-9._-]+', '_', args.model or 'model')}_" \
                               f"{report['date'][:19].replace(':', '').replace('-', '')}"
    stem = out_dir / name
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    print(table(levels))
    written = [stem.with_suffix(".json")]
    if len(levels) > 1 and not args.no_plots:
        try:
            written += plot_sweep(levels, stem, args.model or args.base_url)
        except ImportError as err:
            print(f"{PROG}: no plots: {err} (pip install matplotlib)", file=sys.stderr)
    print("wrote " + ", ".join(str(p) for p in written))
    return 1 if any(s["failed"] for s in levels) else 0


if __name__ == "__main__":
    sys.exit(main())
