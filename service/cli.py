"""`staticmoe` console script: `staticmoe serve [flags]`, `staticmoe bench serve [flags]`, `staticmoe --version`.

Every serve flag can also come from the environment as STATICMOE_<FLAG> (dashes → underscores, upper case; e.g.
STATICMOE_API_KEY, STATICMOE_MAX_QUEUE, STATICMOE_RANDOM_WEIGHTS=1). A flag on the command line wins over the env; an
empty variable counts as unset.
With no flags, `staticmoe serve` serves the built-in `tiny` model on 127.0.0.1:8000.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import math
import os
import re
import socket
import sys

from model.dtypes import AUTO, DTYPE_NAMES
from model.presets import PRESETS, TINY
from service.arg_types import ArgumentValueError, non_negative_float, non_negative_int, positive_float, positive_int
from service.reasoning import REASONING_PARSERS
from service.settings import (DEFAULT_DRAIN_TIMEOUT_S, LOOPBACK_HOSTS, ServiceSettings, is_loopback,
                              unsendable_key)
from service.tool_parsers import PARSERS
from service.version import package_version
from model.quant_config import QUANTIZATIONS

ENV_PREFIX = "STATICMOE_"
# Engine settings the CLI passes on only when given, so their defaults live in EngineConfig alone.
ENGINE_FLAGS = ("max_num_seqs", "max_num_batched_tokens", "prefill_hold_steps", "max_model_len", "num_kv_blocks",
                "block_size", "dtype", "device", "quantization", "logprobs_mode", "seed", "gpu_memory_utilization")
TRUE_WORDS, FALSE_WORDS = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}

logger = logging.getLogger("staticmoe.service")


def env_name(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def _env_value(name: str) -> str | None:
    """The variable's value; an empty one (compose's `${X:-}`, a Kubernetes `value: ""`) counts as unset."""
    raw = os.environ.get(name)
    return raw if raw is not None and raw.strip() else None


def _env_bool(name: str) -> bool | None:
    raw = _env_value(name)
    if raw is None:
        return None
    word = raw.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise SystemExit(f"staticmoe: error: {name}={raw!r} is not a boolean (use 1/0, true/false, yes/no, on/off)")


class EnvDefaults:
    """Adds flags whose default comes from STATICMOE_<FLAG> when set; the help text names the variable."""

    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser

    def value(self, flag: str, type_=str, default=None, help_: str = "", aliases: tuple[str, ...] = (),
              **kwargs) -> None:
        name = env_name(flag)
        raw = _env_value(name)
        if raw is not None:
            try:
                default = type_(raw)
            except (TypeError, ValueError) as err:
                raise SystemExit(f"staticmoe: error: {name}={raw!r}: {err}") from None
            if "choices" in kwargs and default not in kwargs["choices"]:  # argparse checks only given values
                raise SystemExit(f"staticmoe: error: {name}={raw!r}: choose from {', '.join(kwargs['choices'])}")
        self.parser.add_argument(flag, *aliases, type=type_, default=default, help=f"{help_} [env {name}]", **kwargs)

    def switch(self, flag: str, help_: str) -> None:
        name = env_name(flag)
        self.parser.add_argument(flag, action="store_true", default=bool(_env_bool(name)),
                                 help=f"{help_} [env {name}]")


def host_list(text: str) -> tuple[str, ...]:
    return tuple(h.strip() for h in text.split(",") if h.strip())


def port_number(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError(f"must be in 0..65535, got {value}")
    return value


def device_name(text: str) -> str:
    """--device: only what the engine runs on (torch parses meta, xpu, mps too, and the load then fails)."""
    if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", text):
        raise ArgumentValueError(f"must be auto, cpu, cuda or cuda:N, got {text!r}")
    return text


def memory_fraction(text: str) -> float:
    value = float(text)
    if not 0.05 <= value <= 1.0:  # EngineConfig's range
        raise ArgumentValueError(f"must be in [0.05, 1], got {text}")
    return value


def seed_value(text: str) -> int:
    value = non_negative_int(text)
    if value >= 2**64:  # what torch.Generator.manual_seed takes
        raise ArgumentValueError(f"must be < 2**64, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="staticmoe", description="Serve Mixture-of-Experts LLMs over HTTP.")
    parser.add_argument("--version", action="version", version=f"staticmoe {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the OpenAI-compatible HTTP server",
                                description="Run the OpenAI-compatible HTTP server. Every flag can also be set "
                                            "through the environment variable shown in brackets.")
    f = EnvDefaults(serve)
    f.value("--model", help_="checkpoint directory (HF layout, safetensors) to serve", metavar="DIR")
    f.value("--preset", help_=f"named model shape ({', '.join(PRESETS)}); all but {TINY} need --random-weights",
            metavar="NAME")
    f.switch("--random-weights", "initialise the preset with seeded random weights instead of a checkpoint")
    f.value("--served-model-name", help_="model id clients send and /v1/models lists (default: the preset name "
                                         "or the --model path)", metavar="NAME", nargs="+")
    f.value("--host", default="127.0.0.1", help_="address to bind")
    f.value("--port", type_=port_number, default=8000, help_="port to bind (0 = any free port)")
    f.value("--api-key", help_="require 'Authorization: Bearer KEY' on /v1/* (compared in constant time)",
            metavar="KEY")
    f.switch("--allow-unauthenticated", "serve without --api-key on a non-loopback --host (refused otherwise)")
    f.value("--allowed-hosts", type_=host_list, help_="comma-separated Host header names accepted ('*' = any; "
                                                      "default: the loopback names when --host is loopback, else "
                                                      "any)", metavar="NAMES")
    f.value("--max-queue", type_=non_negative_int, default=1024,
            help_="sequences admitted beyond the running batch before new requests get 429")
    f.value("--max-body-bytes", type_=positive_int, default=1 << 20, help_="largest request body; larger get 413")
    f.value("--read-timeout", type_=positive_float, default=30.0,
            help_="seconds a client has to send a request's headers, and then its body (408 after)")
    f.value("--max-connections", type_=positive_int, default=2048,
            help_="open HTTP connections; a request on one more gets 503")
    f.value("--request-timeout", type_=non_negative_float, default=600.0,
            help_="seconds a request may take from admission to its last token (504 after; 0 = no limit)")
    f.value("--engine-stall-timeout", type_=positive_float, default=120.0,
            help_="seconds an engine step may run before the engine counts as hung (/health 503, requests in "
                  "flight fail)")
    f.switch("--parse-special-tokens-in-content", "chat: read special-token text in message content (e.g. "
                                                   "<|im_end|>) as special tokens (default: as plain text)")
    f.switch("--ignore-unknown-fields", "accept and ignore request fields this server does not know (logged), as "
                                        "vLLM does (default: 400 naming the field)")
    f.value("--tool-call-parser", default="hermes", choices=[*PARSERS, "none"],
            help_="format of the model's tool calls, parsed into tool_calls (hermes: Qwen2.5/Qwen3 <tool_call>); "
                  "none: requests with tools get 400")
    f.value("--reasoning-parser", default="none", choices=[*REASONING_PARSERS, "none"],
            help_="split the model's <think> text into reasoning_content (qwen3; default none: all is content)")
    f.value("--chat-template", help_="Jinja chat template file replacing the tokenizer's (e.g. one that renders "
                                     "tools), or the template itself (a value holding { or })", metavar="FILE")
    f.value("--logprobs-mode", choices=["raw_logprobs", "processed_logprobs"],
            help_="logprobs of the model's distribution (raw, default) or of the one sampled from (after "
                  "penalties, temperature, top-k/p and masks)")
    f.switch("--vllm-metric-names", "/metrics also exports the request metrics under vLLM's names (vllm:...)")
    f.value("--max-num-seqs", type_=positive_int, help_="sequences in one engine step (default: the engine's)")
    f.value("--max-num-batched-tokens", type_=positive_int,
            help_="new tokens in one engine step (default: the engine's, by device)")
    f.value("--max-model-len", type_=positive_int, help_="context length (default: the model's, capped by the "
                                                          "KV cache)")
    f.value("--prefill-hold-steps", type_=non_negative_int,
            help_="while sequences decode, a new prompt waits up to N steps for others to prefill with it (fewer "
                  "eager mixed steps, higher TTFT; default 0: admitted at once)", metavar="N")
    f.value("--num-kv-blocks", type_=positive_int, help_="KV-cache blocks (default: sized from free memory)")
    f.value("--gpu-memory-utilization", type_=memory_fraction,
            help_="fraction of the GPU's memory the engine may fill (weights, activations, CUDA graphs, KV cache) "
                  "when it sizes the KV cache (default 0.9, as vLLM's)", metavar="F")
    f.value("--block-size", type_=positive_int, help_="tokens per KV-cache block (default: the engine's)")
    f.value("--dtype", choices=[AUTO, *DTYPE_NAMES],
            help_="weights and activations (default auto: bfloat16 on CUDA, float32 on CPU)")
    f.value("--device", type_=device_name, help_="auto, cpu, cuda or cuda:N (default auto)")
    f.value("--seed", type_=seed_value, help_="seeds the random stream of sampled requests that send no seed (default "
                                            "0, as vLLM's); a request's own seed is unaffected", metavar="N")
    f.value("--cpu-threads", type_=non_negative_int, help_="torch CPU threads (default: half the CPUs this process "
                                                           "may use when the engine runs on the CPU and "
                                                           "OMP_NUM_THREADS is unset; 0 = torch's default)",
            metavar="N")
    f.value("--quantization", choices=list(QUANTIZATIONS),
            help_="fp8: quantise the experts and linears of a bf16 checkpoint or preset to FP8 (128x128 blocks) at "
                  "load; none (default) keeps its precision. A block-FP8 checkpoint is served in FP8 either way")
    f.switch("--enforce-eager", "never capture CUDA graphs")
    f.switch("--no-piecewise-graphs", "run steps that prefill eagerly instead of as CUDA graphs of their "
                                      "non-attention parts at bucketed row counts (on by default)")
    f.switch("--no-async-scheduling", "read each step's sampled tokens back before launching the next step")
    f.switch("--no-prefix-caching", "prefill every prompt in full instead of reusing the KV blocks of prefixes "
                                    "seen before (automatic prefix caching is on by default)")
    f.value("--tensor-parallel", type_=positive_int, help_="ranks (one process and GPU each) the model is split "
                                                          "over: attention heads, vocabulary, dense and shared-expert "
                                                          "MLPs (default 1, or --expert-parallel)", metavar="N",
            aliases=("--tensor-parallel-size",))  # vLLM's name
    f.value("--expert-parallel", type_=positive_int, help_="contiguous expert ranges the routed experts are split "
                                                          "into; divides --tensor-parallel, whose ranks share each "
                                                          "range by splitting the experts' columns (default 1)",
            metavar="M")
    f.value("--collective-timeout", type_=positive_float, default=300.0,
            help_="seconds a collective between ranks may wait before the engine fails (a rank died or hangs)")
    f.switch("--expert-metrics", "export staticmoe_expert_tokens_total{layer,expert} even when layers x experts "
                                 "> 8192 (default: only up to 8192 series)")
    f.switch("--no-expert-metrics", "no per-expert load accounting at all (no expert_* metrics)")
    f.value("--moe-peak-flops", type_=positive_float, help_="dense peak FLOP/s of the device in the experts' precision "
                                                   "(bf16, or FP8) for staticmoe_moe_tensor_core_utilization "
                                                   "(default: from the device name)")
    f.value("--drain-timeout", type_=non_negative_float, default=DEFAULT_DRAIN_TIMEOUT_S,
            help_="seconds SIGTERM waits for in-flight requests (keep it below the orchestrator's grace period)")
    f.value("--log-level", default="info", choices=["debug", "info", "warning", "error"], help_="log verbosity")

    bench = commands.add_parser("bench", help="benchmarks against a running server (see `staticmoe bench serve "
                                              "--help`)")
    bench.add_argument("bench_command", choices=["serve"], help="serve: load generator against a server")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments of the benchmark")
    return parser


def resolve_model(args: argparse.Namespace) -> tuple[str, bool, str]:
    """(engine model source, random_weights, served model name) from --model / --preset / --random-weights."""
    if args.model and args.preset:
        raise SystemExit("staticmoe: error: give either --model DIR or --preset NAME, not both")
    if args.model:
        if not os.path.isdir(args.model):
            raise SystemExit(f"staticmoe: error: --model {args.model!r} is not a directory (for a named shape use "
                             f"--preset NAME --random-weights)")
        source, name = args.model, args.model
    else:
        source = name = args.preset or TINY
        if source not in PRESETS:  # was blamed on a missing --random-weights; a directory here was read as a model
            raise SystemExit(f"staticmoe: error: --preset {source!r} is unknown; presets: {', '.join(PRESETS)} "
                             f"(a checkpoint directory goes to --model)")
        if source != TINY and not args.random_weights:
            raise SystemExit(f"staticmoe: error: --preset {source} has no weights here; add --random-weights")
    served = args.served_model_name
    if isinstance(served, list):  # given on the command line (nargs="+", so vLLM's list gets a clear answer)
        if len(served) > 1:
            raise SystemExit(f"staticmoe: error: --served-model-name takes one name here (vLLM's aliases are not "
                             f"supported), got {len(served)}: {', '.join(served)}")
        served = served[0]
    return source, bool(args.random_weights), served or name


def expert_metrics_mode(args: argparse.Namespace) -> str:
    if args.expert_metrics and args.no_expert_metrics:
        raise SystemExit("staticmoe: error: --expert-metrics and --no-expert-metrics contradict each other")
    return "on" if args.expert_metrics else "off" if args.no_expert_metrics else "auto"


def build_engine_config(args: argparse.Namespace):
    """model.engine.EngineConfig from the model selection and the engine flags that were given."""
    from model.engine import EngineConfig

    source, random_weights, _ = resolve_model(args)
    given = {name: getattr(args, name) for name in ENGINE_FLAGS if getattr(args, name) is not None}
    if args.no_prefix_caching:
        given["enable_prefix_caching"] = False
    if args.no_piecewise_graphs:
        given["piecewise_graphs"] = False
    if "STATICMOE_PIECEWISE_GRAPHS" in os.environ:  # session 14's opt-in, before they were on by default
        logger.warning("STATICMOE_PIECEWISE_GRAPHS is not read any more: piecewise CUDA graphs are on by default; "
                       "--no-piecewise-graphs or STATICMOE_NO_PIECEWISE_GRAPHS=1 turns them off")
    return EngineConfig(model=source, random_weights=random_weights, enforce_eager=args.enforce_eager,
                        expert_metrics=expert_metrics_mode(args) != "off",
                        async_scheduling=not args.no_async_scheduling, **given)


def parallel_config(args: argparse.Namespace):
    """model.parallel.ParallelConfig from --tensor-parallel / --expert-parallel, or None for one rank."""
    tp, ep = args.tensor_parallel, args.expert_parallel
    if tp is None and ep is None:
        return None
    if args.quantization == "fp8":
        raise SystemExit("staticmoe: error: --quantization fp8 runs on one GPU only (no --tensor-parallel / "
                         "--expert-parallel yet)")
    from model.parallel import ParallelConfig

    try:  # the process groups take it as a timedelta: inf or 1e300 s failed the background load with OverflowError
        if not math.isfinite(args.collective_timeout):
            raise OverflowError
        datetime.timedelta(seconds=args.collective_timeout)
    except OverflowError:
        raise SystemExit(f"staticmoe: error: --collective-timeout {args.collective_timeout}: too large for a "
                         f"timeout (at most {datetime.timedelta.max.total_seconds():.0f} s)") from None
    try:
        return ParallelConfig(tensor_parallel=tp or ep, expert_parallel=ep or 1,
                              collective_timeout_s=args.collective_timeout)
    except ValueError as err:
        raise SystemExit(f"staticmoe: error: {err}") from None


def service_settings(args: argparse.Namespace, served_name: str) -> ServiceSettings:
    """The HTTP settings; refuses (fails closed) an open --host without an API key unless explicitly allowed."""
    api_key = args.api_key or None
    if api_key is not None and unsendable_key(api_key):
        given = "--api-key" if os.environ.get(env_name("--api-key")) != api_key else env_name("--api-key")
        raise SystemExit(f"staticmoe: error: {given}: the key {unsendable_key(api_key)}; no request can carry it")
    if api_key is None and not is_loopback(args.host) and not args.allow_unauthenticated:
        raise SystemExit(f"staticmoe: error: --host {args.host} is reachable from other machines but no API key is "
                         f"set: set --api-key KEY ({env_name('--api-key')}), or pass --allow-unauthenticated to "
                         f"serve anyone who can connect")
    default_hosts = LOOPBACK_HOSTS if is_loopback(args.host) else ("*",)
    allowed = default_hosts if args.allowed_hosts is None else args.allowed_hosts  # empty: ServiceSettings refuses
    try:
        return ServiceSettings(served_model_name=served_name, api_key=api_key, max_body_bytes=args.max_body_bytes,
                               drain_timeout_s=args.drain_timeout, read_timeout_s=args.read_timeout,
                               max_connections=args.max_connections, allowed_hosts=allowed,
                               parse_special_tokens_in_content=args.parse_special_tokens_in_content,
                               ignore_unknown_fields=args.ignore_unknown_fields,
                               tool_call_parser=None if args.tool_call_parser == "none" else args.tool_call_parser,
                               reasoning_parser=None if args.reasoning_parser == "none" else args.reasoning_parser,
                               vllm_metric_names=args.vllm_metric_names)
    except ValueError as err:
        raise SystemExit(f"staticmoe: error: {err}") from None


def read_chat_template(path: str | None) -> str | None:
    """--chat-template: read and compiled at start-up, so a bad path or template stops the server at once (not
    every chat request with a 400 that blames the client). As in vLLM, a value that is no file but holds `{`, `}`
    or a newline is the template itself, its backslash escapes (\\n) decoded."""
    from model.chat_template import ChatTemplateError, check_chat_template

    if path is None:
        return None
    try:
        try:
            with open(path, encoding="utf-8") as f:
                template = f.read()
        except OSError:
            if not any(c in path for c in "{}\n"):
                raise
            # unicode_escape reads bytes as latin-1: other characters pass through it as \\u escapes
            template = path.encode("latin-1", "backslashreplace").decode("unicode_escape")
        check_chat_template(template)
    except (OSError, UnicodeDecodeError, ChatTemplateError) as err:
        raise SystemExit(f"staticmoe: error: --chat-template {path!r}: {err}") from None
    return template


def preflight(args: argparse.Namespace, engine_config, source: str, random_weights: bool, parallel=None) -> None:
    """What can be checked before the port opens and the weights load in the background (minutes for a large
    checkpoint): the device, the checkpoint's config and tokenizer, --max-model-len, --cpu-threads and how
    --tensor-parallel/--expert-parallel split the model's heads and experts."""
    from model.loader import resolve_source

    try:
        device = engine_config.resolve_device()
    except ValueError as err:
        raise SystemExit(f"staticmoe: error: --device: {err}") from None
    if parallel is not None and device.type == "cuda":
        import torch

        from model.parallel.launcher import launched_by_torchrun

        gpus = torch.cuda.device_count()  # the launcher puts rank r on cuda:r of this host (torchrun: its own)
        if not launched_by_torchrun() and gpus < parallel.world_size:
            raise SystemExit(f"staticmoe: error: --tensor-parallel {parallel.world_size} needs {parallel.world_size} "
                             f"GPUs; {gpus} GPU(s) visible (CUDA_VISIBLE_DEVICES)")
    try:
        config = resolve_source(source, random_weights)[0]
    except (ValueError, OSError) as err:  # ConfigError and CheckpointError are ValueErrors
        flag = f"--model {source!r}" if args.model else f"--preset {source}"
        raise SystemExit(f"staticmoe: error: {flag}: {err}") from None
    if args.max_model_len is not None and args.max_model_len > config.max_position_embeddings:
        raise SystemExit(f"staticmoe: error: --max-model-len {args.max_model_len} exceeds the model's "
                         f"max_position_embeddings ({config.max_position_embeddings})")
    if args.num_kv_blocks is not None and args.max_model_len is not None:
        from model.kv_groups import KvCacheGroups, max_sequence_tokens

        # the engine's own test (model/engine/model_runner.py), made before the port opens and the weights load
        try:
            fits = max_sequence_tokens(KvCacheGroups.of(config), args.num_kv_blocks, engine_config.block_size, 1,
                                       args.max_model_len)
        except ValueError as err:  # STATICMOE_SLIDING_KV
            raise SystemExit(f"staticmoe: error: {err}") from None
        if fits < args.max_model_len:
            raise SystemExit(f"staticmoe: error: --num-kv-blocks {args.num_kv_blocks} of {engine_config.block_size} "
                             f"tokens hold a sequence of {fits} tokens, fewer than --max-model-len "
                             f"{args.max_model_len}; raise --num-kv-blocks or lower --max-model-len")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if args.cpu_threads and args.cpu_threads > cpus:  # thousands of threads crash libgomp, or the process
        raise SystemExit(f"staticmoe: error: --cpu-threads {args.cpu_threads} exceeds the {cpus} CPUs this process "
                         f"may use")
    if parallel is not None:
        from model.parallel.config import RankLayout

        try:
            RankLayout.build(config, parallel, 0)  # every rank's layout follows the same divisions
        except ValueError as err:
            raise SystemExit(f"staticmoe: error: --tensor-parallel {parallel.tensor_parallel} --expert-parallel "
                             f"{parallel.expert_parallel}: {err}") from None


def check_listen_address(host: str, port: int) -> None:
    """Bind what uvicorn will bind (asyncio's create_server: every address the host resolves to), then let go: a
    busy port or a foreign address stops the server here, naming the flag, before the model loads (uvicorn binds
    after its start-up, and its error names neither flag). A port taken in the moment between is still uvicorn's."""
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as err:
        hint = " (an IPv6 address goes without brackets: ::1)" if host.startswith("[") else ""
        raise SystemExit(f"staticmoe: error: --host {host!r}: cannot resolve it ({err}){hint}") from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio: TIME_WAIT does not block
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as err:
                raise SystemExit(f"staticmoe: error: --host {host} --port {port}: cannot listen on {address[0]} port "
                                 f"{port}: {err.strerror}") from None


def serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parallel = parallel_config(args)
    import prometheus_client

    from model.engine import LLMEngine
    from service.app import create_app
    from service.cpu_threads import set_cpu_threads
    from service.engine_client import ClientOptions, EngineClient
    from service.server import run_server

    source, random_weights, served_name = resolve_model(args)
    settings = service_settings(args, served_name)
    mode = expert_metrics_mode(args)
    try:
        engine_config = build_engine_config(args)
        options = ClientOptions(model_name=served_name, max_queue=args.max_queue,
                                max_running=engine_config.max_num_seqs, expert_metrics=mode,
                                moe_peak_flops=args.moe_peak_flops, request_timeout_s=args.request_timeout,
                                stall_timeout_s=args.engine_stall_timeout, freeze_heap=True)
    except ValueError as err:
        raise SystemExit(f"staticmoe: error: {err}") from None
    preflight(args, engine_config, source, random_weights, parallel)
    make_engine = lambda: LLMEngine(engine_config)  # noqa: E731
    if parallel is not None:
        from model.parallel.launcher import launched_by_torchrun, parallel_engine
        from model.parallel.worker import torchrun_worker_main

        if launched_by_torchrun() and int(os.environ["RANK"]) > 0:  # torchrun rank > 0: the model only, no HTTP
            torchrun_worker_main(engine_config, parallel)
            return 0
        make_engine = lambda: parallel_engine(engine_config, parallel)  # noqa: E731
    check_listen_address(args.host, args.port)
    prometheus_client.disable_created_metrics()  # no *_created series (as vLLM's /metrics)

    chat_template = read_chat_template(args.chat_template)

    def build_engine():
        set_cpu_threads(args.cpu_threads, engine_config.resolve_device())
        engine = make_engine()
        if chat_template is not None:
            engine.tokenizer.chat_template = chat_template
        return engine

    client = EngineClient(build_engine, options)
    app = create_app(client, settings)
    logger.info("serving model %s (source %s, random_weights=%s) on http://%s:%d, requested device=%s dtype=%s; "
                "it loads in the background (/health answers 503 until it is ready)", served_name, source,
                random_weights, args.host, args.port, engine_config.device, engine_config.dtype)
    return run_server(app, client, settings, args.host, args.port, args.log_level)


def bench(args: argparse.Namespace) -> int:
    from service.loadgen.main import main as loadgen_main  # imported here: the server does not need it

    result = loadgen_main(list(args.bench_args))
    return int(result or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = ["serve"]
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
