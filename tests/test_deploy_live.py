"""Deployment checks against a real server (tiny model, uvicorn on loopback) and real tools:

- every metric name the Grafana dashboard, the alert rules and the built-in page use is in /metrics after traffic;
- a real Prometheus server (Debian's) on loopback scrapes the service with our scrape job and rules, and its HTTP
  API returns our generation counter, evaluates every dashboard expression, and loads the alert rules;
- the built-in /dashboard page, in headless Chromium, shows live numbers and the expert heatmap after traffic
  (screenshot: test-artifacts/dashboard.png);
- the image's HEALTHCHECK script passes against the live server.
"""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys
import threading
import time

import httpx
import pytest
import yaml

from tests.browser_fixtures import chromium_driver
from tests.deploy_fixtures import (
    ALERT_RULES, ARTIFACTS, DASHBOARD_HTML, HEALTHCHECK_SCRIPT, PROMETHEUS_CONFIG, all_panels, dashboard_exprs,
    grafana_to_promql, is_label_values_query, load_dashboard, load_yaml, metric_names, rule_exprs, run, tool,
)
from tests.service_fixtures import free_port, metric, parse_metrics, served, wait_for  # noqa: F401

# Every metric issue 5 fixes, as exposed samples (counters carry _total, histograms _bucket).
REQUIRED_SAMPLES = {
    "staticmoe_time_to_first_token_seconds_bucket", "staticmoe_inter_token_latency_seconds_bucket",
    "staticmoe_e2e_request_latency_seconds_bucket", "staticmoe_request_queue_time_seconds_bucket",
    "staticmoe_prompt_tokens_total", "staticmoe_generation_tokens_total", "staticmoe_num_requests_running",
    "staticmoe_num_requests_waiting", "staticmoe_kv_cache_usage_perc", "staticmoe_request_success_total",
    "staticmoe_moe_tensor_core_utilization", "staticmoe_moe_flops_total", "staticmoe_moe_kernel_seconds_bucket",
    "staticmoe_expert_tokens_total", "staticmoe_expert_load_imbalance", "staticmoe_expert_idle",
    "staticmoe_prefix_cache_queries_total", "staticmoe_prefix_cache_hits_total",
}


def complete(server, client: httpx.Client, max_tokens: int = 12, stream: bool = False) -> int:
    body = {"model": "tiny", "prompt": "The experts of a mixture", "max_tokens": max_tokens, "stream": stream}
    response = client.post(server.base_url + "/v1/completions", json=body, headers=server.headers, timeout=60)
    assert response.status_code == 200, response.text
    return 0 if stream else response.json()["usage"]["completion_tokens"]


def send_traffic(server, requests: int = 8, concurrency: int = 4) -> int:
    """Completions (some streamed) and one chat; returns the completion tokens of the non-streamed ones."""
    with httpx.Client() as client, concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(complete, server, client, 8 + i % 8, i % 4 == 3) for i in range(requests)]
        chat = client.post(server.base_url + "/v1/chat/completions", headers=server.headers, timeout=60,
                           json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6})
        assert chat.status_code == 200, chat.text
        return sum(f.result() for f in futures)


def exported_sample_names(server) -> set[str]:
    return {name for name, _ in parse_metrics(server.metrics_text())}


def generation_tokens(server) -> float:
    return metric(parse_metrics(server.metrics_text()), "staticmoe_generation_tokens_total")


@pytest.fixture(scope="module")
def with_traffic(served):
    assert send_traffic(served) > 0
    return served


def test_every_metric_the_dashboards_and_rules_use_is_exported(with_traffic):
    exported = exported_sample_names(with_traffic)
    assert REQUIRED_SAMPLES <= exported, f"missing from /metrics: {sorted(REQUIRED_SAMPLES - exported)}"
    grafana = {n for e in dashboard_exprs(load_dashboard()) for n in metric_names(e) if not n.startswith("DCGM_")}
    rules = {n for e in rule_exprs(load_yaml(ALERT_RULES)) for n in metric_names(e)}
    # the built-in page names histograms by family (it appends _bucket itself)
    page = {n for n in metric_names(DASHBOARD_HTML.read_text())}
    assert grafana and rules and page
    for source, names in (("Grafana dashboard", grafana), ("alert rules", rules), ("built-in dashboard", page)):
        missing = {n for n in names if n not in exported and n + "_bucket" not in exported}
        assert not missing, f"{source} uses metrics the service does not export: {sorted(missing)}"


def test_image_healthcheck_passes_against_the_live_server(with_traffic):
    result = run([sys.executable, str(HEALTHCHECK_SCRIPT)], env={"STATICMOE_PORT": str(with_traffic.port)})
    assert result.returncode == 0, result.stderr


# ---- Prometheus -----------------------------------------------------------------------------------------------------


class PrometheusServer:
    """Debian's prometheus on a free loopback port, with deploy/prometheus's staticmoe job and alert rules."""

    def __init__(self, tmp_path, target_port: int):
        config = load_yaml(PROMETHEUS_CONFIG)
        job = next(j for j in config["scrape_configs"] if j["job_name"] == "staticmoe")
        job["static_configs"][0]["targets"] = [f"127.0.0.1:{target_port}"]
        job.update(scrape_interval="1s", scrape_timeout="1s")
        config["scrape_configs"] = [job]  # dcgm-exporter and Prometheus itself are not on this machine
        config["global"]["evaluation_interval"] = "1s"
        config["rule_files"] = [str(ALERT_RULES)]
        path = tmp_path / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = open(tmp_path / "prometheus.log", "w+")
        self.proc = subprocess.Popen(
            [tool("prometheus"), f"--config.file={path}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address={self.url.removeprefix('http://')}"],
            stdout=self.log, stderr=subprocess.STDOUT)

    def api(self, endpoint: str, **params) -> dict:
        response = httpx.get(f"{self.url}/api/v1/{endpoint}", params=params, timeout=10)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", (params, body)
        return body["data"]

    def query(self, promql: str) -> list[dict]:
        return self.api("query", query=promql)["result"]

    def wait_ready(self, timeout: float = 30):
        def ready():
            assert self.proc.poll() is None, self.log_text()
            try:
                return httpx.get(self.url + "/-/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False
        wait_for(ready, timeout)

    def log_text(self) -> str:
        self.log.seek(0)
        return self.log.read()[-4000:]

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def counter_scraped(prometheus, server) -> bool:
    """Prometheus's latest sample of our generation counter equals what /metrics says now."""
    result = prometheus.query("sum(staticmoe_generation_tokens_total)")
    return bool(result) and float(result[0]["value"][1]) == generation_tokens(server)


def test_prometheus_scrapes_the_service_and_evaluates_dashboard_and_rules(with_traffic, tmp_path):
    server = with_traffic
    prometheus = PrometheusServer(tmp_path, server.port)
    try:
        prometheus.wait_ready()
        wait_for(lambda: counter_scraped(prometheus, server), timeout=30, interval=0.5)
        send_traffic(server, requests=4)  # traffic between scrapes, so rates over the window are non-zero
        wait_for(lambda: counter_scraped(prometheus, server), timeout=30, interval=0.5)
        time.sleep(1.5)  # one more scrape and rule evaluation after the traffic

        targets = prometheus.api("targets")["activeTargets"]
        assert [t["health"] for t in targets] == ["up"], targets
        assert prometheus.query('up{job="staticmoe"}')[0]["value"][1] == "1"
        rate = prometheus.query("sum(rate(staticmoe_generation_tokens_total[1m]))")
        assert float(rate[0]["value"][1]) > 0

        # Every dashboard expression is valid PromQL against the live data; ours return series (DCGM's need a GPU).
        for expr in dashboard_exprs(load_dashboard()):
            if is_label_values_query(expr):
                continue
            result = prometheus.query(grafana_to_promql(expr))
            if not any(n.startswith("DCGM_") for n in metric_names(expr)):
                assert result, f"no series for dashboard expression: {expr}"
        layers = prometheus.api("label/layer/values")
        assert layers, "the heatmap's layer variable has values"

        groups = prometheus.api("rules")["groups"]
        loaded = {rule["name"]: rule for group in groups for rule in group["rules"]}
        expected = {r["alert"] for g in load_yaml(ALERT_RULES)["groups"] for r in g["rules"]}
        assert set(loaded) == expected
        assert all(rule["health"] == "ok" for rule in loaded.values()), loaded
        assert loaded["StaticmoeDown"]["state"] == "inactive", "the service is up"
    finally:
        prometheus.stop()


# ---- built-in dashboard in headless Chromium ------------------------------------------------------------------------


def test_dashboard_route_serves_a_self_contained_page(served):
    response = httpx.get(served.base_url + "/dashboard", timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert "connect-src 'self'" in response.headers["content-security-policy"]
    assert "default-src 'none'" in response.headers["content-security-policy"]
    page = response.text
    assert "<canvas" in page and 'fetch("metrics"' in page
    for external in ("http://", "https://", "<script src", "<link", "@import", "//cdn"):
        assert external not in page, f"the page must not load anything from elsewhere ({external})"


def test_builtin_dashboard_shows_live_data_in_headless_chromium(with_traffic, tmp_path):
    server = with_traffic
    driver = chromium_driver(tmp_path)
    stop = threading.Event()

    def keep_generating():
        while not stop.is_set():
            send_traffic(server, requests=4, concurrency=2)

    traffic = threading.Thread(target=keep_generating, daemon=True)
    try:
        driver.get(server.base_url + "/dashboard?interval=400")
        traffic.start()

        def data(element_id: str, attribute: str = "data-value") -> float:
            value = driver.find_element("id", element_id).get_attribute(attribute)
            return float(value) if value not in (None, "") else float("nan")

        wait_for(lambda: data("output-tps") > 0, timeout=30, interval=0.2)
        assert data("ttft") > 0 and data("requests-ps") >= 0
        assert data("tensor-util") >= 0, "tensor-core utilization is shown (0 on a CPU)"
        wait_for(lambda: data("prefix-hit-rate") > 0, timeout=30, interval=0.2)  # the traffic repeats one prompt
        wait_for(lambda: data("heatmap", "data-nonzero-cells") > 0, timeout=30, interval=0.2)
        # a few more polls under load, so the screenshot shows a throughput curve, then the artifact
        polls = data("status", "data-polls")
        wait_for(lambda: data("status", "data-polls") >= polls + 12, timeout=30, interval=0.2)
        ARTIFACTS.mkdir(exist_ok=True)
        assert driver.save_screenshot(str(ARTIFACTS / "dashboard.png"))
        stop.set()
        traffic.join(60)
        # once traffic stops, the page's total converges to the server's own counter
        expected = generation_tokens(server)
        wait_for(lambda: data("total-output-tokens") == expected, timeout=15, interval=0.2)
        samples = parse_metrics(server.metrics_text())
        layers = {dict(labels)["layer"] for name, labels in samples if name == "staticmoe_expert_tokens_total"}
        experts = {dict(labels)["expert"] for name, labels in samples if name == "staticmoe_expert_tokens_total"}
        assert data("heatmap", "data-layers") == len(layers) and data("heatmap", "data-experts") == len(experts)
        assert driver.find_element("id", "status").get_attribute("class") == "status ok"

        origins = driver.execute_script(
            "return performance.getEntriesByType('resource').map(e => new URL(e.name).origin)")
        assert origins and set(origins) == {server.base_url}, f"the page reached other origins: {origins}"
        errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        stop.set()
        driver.quit()
