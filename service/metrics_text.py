"""The /metrics text: prometheus-client's `generate_latest`, except for families rendered ahead of the scrape.

Why a fast path at all: `generate_latest` formats every sample one by one (sorted labels, escaping, value), ~6 µs
each on the 2-core CPU machine. The per-expert counters of a Qwen3-30B-A3B-sized model are 48 × 128 = 6144
samples, ~40-190 ms of held GIL per scrape (benchmarks/NOTES.md, "Metrics on the host"), against the engine thread
that drives the GPU. Those families have a fixed set of label values, so the library renders each sample line's
`name{labels} ` prefix once (at start-up, from a template family); a render is then the prefix + the library's own
`floatToGoString(value)`, and the resulting text is kept until the values change (`RenderedFamily`).
`scrape_text` copies a RenderedFamily's text as is and hands every other family to `generate_latest`, in the
registry's order, so the bytes are those `generate_latest(registry)` gives (tests/test_metrics_scrape.py checks).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString


class RenderedFamily(Metric):
    """A metric family whose text-format lines (`text`, bytes) were rendered ahead. Its Sample list, which only
    library consumers read (`generate_latest(registry)`, `get_sample_value`; `scrape_text` and the vLLM-name
    mirror do not), is built on first access by `build_samples`."""

    def __init__(self, like: Metric, text: bytes, build_samples: Callable[[], list[Sample]]):
        super().__init__(like.name, like.documentation, like.type)  # its `self.samples = []` goes to the setter
        self.text = text
        self._build_samples: Callable[[], list[Sample]] | None = build_samples

    @property
    def samples(self) -> list[Sample]:
        if self._build_samples is not None:
            self._samples, self._build_samples = self._build_samples(), None
        return self._samples

    @samples.setter
    def samples(self, value: list[Sample]) -> None:
        self._samples, self._build_samples = value, None


class _Families:
    """A collector over families already collected (what `generate_latest` takes)."""

    def __init__(self, families: Iterable[Metric]):
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


def family_text(family: Metric) -> bytes:
    return generate_latest(_Families([family]))


def header_and_line_prefixes(template: Metric) -> tuple[bytes, list[str]]:
    """The library's rendering of `template` (its samples carry the label values to be rendered later, in order,
    without timestamps), split into the `# HELP`/`# TYPE` header and each sample line without its value."""
    lines = family_text(template).decode().splitlines(keepends=True)
    header = [line for line in lines if line.startswith("#")]
    samples = lines[len(header):]
    if len(header) != 2 or len(samples) != len(template.samples):
        raise ValueError(f"unexpected text rendering of {template.name!r}: {len(header)} header lines, "
                         f"{len(samples)} sample lines for {len(template.samples)} samples")
    return "".join(header).encode(), [line[: line.rindex(" ") + 1] for line in samples]


def render_lines(prefixes: Sequence[str], values: Iterable[float]) -> str:
    """Sample lines `prefix value`, one per (prefix, value) pair, the value as the library formats it."""
    return "".join([f"{prefix}{text}\n" for prefix, text in zip(prefixes, map(floatToGoString, values))])


def scrape_text(*registries: CollectorRegistry) -> bytes:
    """`generate_latest` of each registry in turn, with each RenderedFamily's text copied instead of formatted
    sample by sample (what the /metrics route serves)."""
    parts, pending = [], []
    for family in (family for registry in registries for family in registry.collect()):
        if isinstance(family, RenderedFamily):
            if pending:
                parts.append(generate_latest(_Families(pending)))
                pending = []
            parts.append(family.text)
        else:
            pending.append(family)
    parts.append(generate_latest(_Families(pending)))
    return b"".join(parts)
