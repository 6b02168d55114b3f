"""ServiceSettings: the HTTP-side knobs (the engine client's live in ClientOptions, the engine's in EngineConfig).

Every limit here has a `staticmoe serve` flag; docs/service.md lists them all."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from service.reasoning import REASONING_PARSERS
from service.tool_parsers import PARSERS

DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB of JSON is far beyond any prompt that fits the context
# Kubernetes gives a pod 120 s (deploy/k8s) between SIGTERM and SIGKILL, of which the preStop hook sleeps 5 s: a
# drain of 90 s leaves time to end the remaining streams in-band and to shut down before the kill.
DEFAULT_DRAIN_TIMEOUT_S = 90.0
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]", "::1")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def unsendable_key(key: str) -> str | None:
    """Why no Authorization header can carry `key` (HTTP trims a value's surrounding whitespace and forbids control
    characters in it; a key read from a file often ends in a newline), or None."""
    if key != key.strip(" \t\r\n\f\v"):
        return "starts or ends with whitespace (a trailing newline from a file?)"
    if any(ord(c) < 32 and c != "\t" or ord(c) == 127 for c in key):
        return "holds a control character"
    return None


@dataclass
class ServiceSettings:
    served_model_name: str = "tiny"
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S  # SIGTERM: longest wait for in-flight requests
    read_timeout_s: float = 30.0  # to receive a request's headers, and then its body
    max_connections: int = 2048  # open HTTP connections; a request beyond gets 503
    # Host header values accepted ("*" = any; a port is ignored). The loopback names by default, so a web page
    # cannot reach a loopback server through a DNS name it controls (DNS rebinding).
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS
    parse_special_tokens_in_content: bool = False  # chat: `<|im_end|>` typed by a user is text unless this is set
    ignore_unknown_fields: bool = False  # accept and ignore request fields nobody defined (vLLM); default 400
    tool_call_parser: str | None = "hermes"  # service/tool_parsers; None: requests with tools are refused
    reasoning_parser: str | None = None  # service/reasoning.py: "qwen3" splits <think> into reasoning_content
    vllm_metric_names: bool = False  # /metrics also under vLLM's names (service/metrics_vllm.py)

    def __post_init__(self):
        if self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {self.max_body_bytes}")
        if self.api_key is not None and not self.api_key:
            self.api_key = None  # an empty key means "no key"
        if self.api_key is not None and unsendable_key(self.api_key):
            raise ValueError(f"the API key (--api-key) {unsendable_key(self.api_key)}: no request can carry it, "
                             f"so every one would get 401")
        if not self.read_timeout_s > 0:
            raise ValueError(f"the read timeout must be > 0 s, got {self.read_timeout_s}")
        if self.drain_timeout_s < 0:
            raise ValueError(f"the drain timeout must be >= 0 s, got {self.drain_timeout_s}")
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {self.max_connections}")
        self.allowed_hosts = tuple(h.strip().lower() for h in self.allowed_hosts if h.strip())
        if not self.allowed_hosts:
            raise ValueError("allowed_hosts is empty (use '*' to accept any Host header)")
        if self.tool_call_parser is not None and self.tool_call_parser not in PARSERS:
            raise ValueError(f"unknown tool-call parser {self.tool_call_parser!r} (known: {', '.join(PARSERS)})")
        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_PARSERS:
            raise ValueError(f"unknown reasoning parser {self.reasoning_parser!r} "
                             f"(known: {', '.join(REASONING_PARSERS)})")
