"""/metrics' per-expert text (service/metrics_experts.py through the fast path of service/metrics_text.py): the
same bytes as prometheus-client's `generate_latest`, values equal to a recount from the published snapshots, the
cached render refreshed by a new snapshot and only then, counters that never decrease, and an engine thread that a
scrape never blocks."""

import random
import threading

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

import service.metrics_experts as metrics_experts
from model.engine import EngineStats, MoeStatsSnapshot
from service.metrics import MoeLayout, ServiceMetrics
from service.metrics_text import scrape_text
from service.metrics_vllm import vllm_registry

LAYERS = ["1", "3", "5"]  # model layer indices of the MoE layers
EXPERTS = [5, 5, 5]
TOKENS, IMBALANCE, IDLE = "staticmoe_expert_tokens", "staticmoe_expert_load_imbalance", "staticmoe_expert_idle"


def configured(counters: bool = True) -> ServiceMetrics:
    metrics = ServiceMetrics("m")
    metrics.configure_moe(MoeLayout(layer_labels=list(LAYERS), experts_per_layer=list(EXPERTS),
                                    device_name="NVIDIA H100", peak_flops=1e15, expert_counters=counters))
    return metrics


def snapshot(totals: list[list[int]], window: list[list[int]], flops: float = 1.0) -> MoeStatsSnapshot:
    return MoeStatsSnapshot("NVIDIA H100", flops, [], totals, window, [1, 3, 5])


def random_rows(rng: random.Random, high: int) -> list[list[int]]:
    return [[rng.choice([0, rng.randint(0, high)]) for _ in range(e)] for e in EXPERTS]


def expert_families(text: bytes) -> dict[str, dict[tuple, float]]:
    """{family name: {(layer, expert) or (layer,): value}} of the per-expert families, from the library's parser."""
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        if family.name in (TOKENS, IMBALANCE, IDLE):
            out[family.name] = {(s.labels["layer"],) + ((s.labels["expert"],) if "expert" in s.labels else ()):
                                s.value for s in family.samples}
    return out


def recount(exported: list[list[int]], window: list[list[int]]) -> dict[str, dict[tuple, float]]:
    """What the three families must show: the running maximum of the totals scraped so far, and the window's
    max / mean (0 when empty) and zero count, computed here from the rows themselves."""
    imbalance, idle = {}, {}
    for layer, row in zip(LAYERS, window):
        idle[(layer,)] = float(len([t for t in row if t == 0]))
        imbalance[(layer,)] = 0.0 if sum(row) == 0 else max(row) * len(row) / sum(row)
    return {TOKENS: {(layer, str(e)): float(v) for layer, row in zip(LAYERS, exported) for e, v in enumerate(row)},
            IMBALANCE: imbalance, IDLE: idle}


def assert_families_equal(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].keys() == want[name].keys(), name
        for labels, value in want[name].items():
            assert got[name][labels] == pytest.approx(value, rel=1e-12), (name, labels)


def test_scrape_text_is_generate_latest_byte_for_byte():
    """Every value class floatToGoString formats differently (0, small, >= 1e7 in Go's exponent form), with the
    vLLM-name mirror after it, as the /metrics route serves it."""
    rng = random.Random(1)
    metrics = configured()
    metrics.ttft.observe(0.3)
    metrics.request_success["stop"].inc()
    registries = [metrics.registry, vllm_registry(metrics.registry)]
    for high in (0, 9, 10**6, 10**9):
        metrics.update_moe(snapshot(random_rows(rng, high), random_rows(rng, 1000)))
        served = scrape_text(*registries)
        assert served == b"".join(generate_latest(r) for r in registries)
        assert served == scrape_text(*registries)  # the cached text again


def test_text_is_the_library_format():
    metrics = configured()
    metrics.update_moe(snapshot([[12345678, 0, 3, 0, 0], [0] * 5, [0] * 5], [[1, 0, 0, 0, 3], [0] * 5, [0] * 5]))
    text = scrape_text(metrics.registry).decode()
    assert "# HELP staticmoe_expert_tokens_total Tokens routed to each expert (one per top-k slot).\n" \
           "# TYPE staticmoe_expert_tokens_total counter\n" \
           'staticmoe_expert_tokens_total{expert="0",layer="1"} 1.2345678e+07\n' \
           'staticmoe_expert_tokens_total{expert="1",layer="1"} 0.0\n' \
           'staticmoe_expert_tokens_total{expert="2",layer="1"} 3.0\n' in text
    assert 'staticmoe_expert_load_imbalance{layer="1"} 3.75\n' in text  # 3 / (4 / 5)
    assert 'staticmoe_expert_idle{layer="3"} 5.0\n' in text
    assert "staticmoe_expert_tokens_created" not in text


def test_values_equal_a_recount_from_the_published_snapshots():
    """Snapshots that go up and down, some published between scrapes (only the latest one counts), one without a
    window (the previous window stays): each scrape equals the recount."""
    rng = random.Random(2)
    metrics = configured()
    exported = [[0] * e for e in EXPERTS]
    window = [[0] * e for e in EXPERTS]
    totals = [[rng.randint(0, 100) for _ in range(e)] for e in EXPERTS]
    for step in range(30):
        totals = [[max(0, t + rng.randint(-20, 40)) for t in row] for row in totals]
        new_window = [] if step % 7 == 3 else random_rows(rng, 50)
        metrics.update_moe(snapshot([list(r) for r in totals], new_window))
        window = new_window or window
        if step % 3 == 1:
            continue  # not scraped: this snapshot never reaches the running maximum
        exported = [[max(e, t) for e, t in zip(erow, trow)] for erow, trow in zip(exported, totals)]
        assert_families_equal(expert_families(scrape_text(metrics.registry)), recount(exported, window))


def test_counters_never_decrease_when_the_snapshots_go_down():
    metrics = configured()
    previous = None
    for level in (50, 40, 45, 10, 0, 60):
        metrics.update_moe(snapshot([[level + e for e in range(n)] for n in EXPERTS], []))
        tokens = expert_families(scrape_text(metrics.registry))[TOKENS]
        if previous is not None:
            assert all(tokens[k] >= previous[k] for k in tokens)
        previous = tokens
    assert previous[("3", "4")] == 64.0  # the last level, above every earlier one
    metrics.update_moe(snapshot([[0] * n for n in EXPERTS], []))
    assert expert_families(scrape_text(metrics.registry))[TOKENS][("3", "4")] == 64.0


def test_cached_render_is_refreshed_after_a_new_snapshot_and_not_before(monkeypatch):
    renders = []
    render_lines = metrics_experts.render_lines
    monkeypatch.setattr(metrics_experts, "render_lines", lambda *a: renders.append(1) or render_lines(*a))
    metrics = configured()
    metrics.update_moe(snapshot([[1] * n for n in EXPERTS], [[1] * n for n in EXPERTS]))
    first = scrape_text(metrics.registry)
    assert len(renders) == len(LAYERS) + 2  # one per layer of counters, one per window family
    renders.clear()
    metrics.update_engine_stats(EngineStats(1, 0, 0.5, 0))  # other metrics change, the snapshot does not
    metrics.update_moe(snapshot([], [], flops=2.0))  # expert accounting off in the engine: nothing new
    again = scrape_text(metrics.registry)
    assert renders == [] and expert_families(again) == expert_families(first)
    metrics.update_moe(snapshot([[7] * n for n in EXPERTS], [[0] * n for n in EXPERTS]))
    refreshed = expert_families(scrape_text(metrics.registry))
    assert renders and refreshed[TOKENS][("5", "0")] == 7.0 and refreshed[IDLE][("1",)] == 5.0


def test_the_fast_path_builds_no_sample_objects_and_library_consumers_still_get_them(monkeypatch):
    metrics = configured()
    metrics.update_moe(snapshot([[4, 0, 0, 0, 2]] * 3, [[4, 0, 0, 0, 2]] * 3))
    built = []
    tokens_family = metrics_experts.tokens_family
    monkeypatch.setattr(metrics_experts, "tokens_family", lambda *a: built.append(1) or tokens_family(*a))
    scrape_text(metrics.registry, vllm_registry(metrics.registry))
    assert built == []
    assert metrics.registry.get_sample_value("staticmoe_expert_tokens_total", {"layer": "3", "expert": "4"}) == 2
    assert built == [1]


def test_counters_off_leaves_the_window_families():
    metrics = configured(counters=False)
    metrics.update_moe(snapshot([[1] * n for n in EXPERTS], [[0, 0, 2, 0, 0]] * 3))
    families = expert_families(scrape_text(metrics.registry))
    assert TOKENS not in families and families[IDLE][("5",)] == 4.0 and families[IMBALANCE][("1",)] == 5.0


def test_a_scrape_in_progress_does_not_block_the_engine_thread(monkeypatch):
    """The engine thread's publish takes no lock a scrape holds: it completes while a render is stalled."""
    inside, release = threading.Event(), threading.Event()
    render_lines = metrics_experts.render_lines

    def stalled(*args):
        inside.set()
        assert release.wait(10)
        return render_lines(*args)

    metrics = configured()
    metrics.update_moe(snapshot([[1] * n for n in EXPERTS], [[1] * n for n in EXPERTS]))
    monkeypatch.setattr(metrics_experts, "render_lines", stalled)
    scraper = threading.Thread(target=scrape_text, args=(metrics.registry,))
    scraper.start()
    try:
        assert inside.wait(10)
        publisher = threading.Thread(target=metrics.update_moe,
                                     args=(snapshot([[9] * n for n in EXPERTS], [[9] * n for n in EXPERTS]),))
        publisher.start()
        publisher.join(5)
        assert not publisher.is_alive()
    finally:
        release.set()
        scraper.join(10)
    monkeypatch.setattr(metrics_experts, "render_lines", render_lines)
    assert expert_families(scrape_text(metrics.registry))[TOKENS][("1", "0")] == 9.0


def test_bench_metrics_scrape_smoke():
    from benchmarks import bench_metrics_scrape

    result = bench_metrics_scrape.main(["--layout", "olmoe", "--repeats", "2", "--publishes-per-scrape", "2"])
    assert result["series"] == 16 * 64 and result["text_bytes"] > 16 * 64 * 40
    assert len(result["scrape_new_snapshot_s"]) == 2 and len(result["scrape_cached_s"]) == 2
    assert len(result["publish_s"]) == 6 and all(t > 0 for t in result["publish_s"] + result["scrape_cached_s"])
