"""ServiceSettings: the HTTP-side knobs (the engine's own knobs live in model.engine.EngineConfig)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB of JSON is far beyond any prompt that fits the context


@dataclass
class ServiceSettings:
    served_model_name: str = "tiny"
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    drain_timeout_s: float = 600.0  # SIGTERM: longest wait for in-flight requests before exiting anyway

    def __post_init__(self):
        if self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {self.max_body_bytes}")
        if self.api_key is not None and not self.api_key:
            self.api_key = None  # an empty key means "no key"
