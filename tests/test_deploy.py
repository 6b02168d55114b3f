"""Static checks of deploy/: Prometheus config and alert rules (promtool), Grafana dashboard and provisioning,
dcgm-exporter counters, the compose file (compose-spec schema) and the Kubernetes manifests (Kubernetes schemas).

Each validator is also fed a broken copy, so a check that silently accepts everything would fail here.
"""

from __future__ import annotations

import csv
import re

import pytest
import yaml

from tests.deploy_fixtures import (
    ALERT_RULES, ALERT_TESTS, COMPOSE_FILE, DCGM_COUNTERS, DEPLOY, DOCKERFILE, GRAFANA_DASHBOARD, GRAFANA_DATASOURCE,
    GRAFANA_PROVIDER, K8S_DIR, PROMETHEUS_CONFIG, SCHEMAS, all_panels, dashboard_exprs, dockerfile_stages,
    grafana_to_promql, is_label_values_query, load_dashboard, load_yaml, load_yaml_documents, metric_names, rule_exprs,
    run, tool,
)

# ---- Prometheus -----------------------------------------------------------------------------------------------------


def test_prometheus_config_passes_promtool():
    result = run([tool("promtool"), "check", "config", str(PROMETHEUS_CONFIG)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout + result.stderr  # alerts.yml is loaded through rule_files


def test_alert_rules_pass_promtool_check():
    result = run([tool("promtool"), "check", "rules", str(ALERT_RULES)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_fire_and_stay_quiet_as_their_unit_tests_expect():
    result = run([tool("promtool"), "test", "rules", ALERT_TESTS.name], cwd=ALERT_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    tested = {test["alertname"] for case in load_yaml(ALERT_TESTS)["tests"] for test in case["alert_rule_test"]}
    defined = {rule["alert"] for group in load_yaml(ALERT_RULES)["groups"] for rule in group["rules"]}
    assert tested == defined, f"alerts without a unit test: {defined - tested}"


def test_promtool_rejects_broken_rules(tmp_path):
    broken = tmp_path / "broken.yml"
    broken.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [
        {"alert": "Bad", "expr": "rate(staticmoe_generation_tokens_total[5m]", "for": "1m"}]}]}))
    assert run([tool("promtool"), "check", "rules", str(broken)]).returncode != 0


def test_alert_rules_cover_down_queue_ttft_and_expert_imbalance():
    rules = {rule["alert"]: rule for group in load_yaml(ALERT_RULES)["groups"] for rule in group["rules"]}
    by_need = {
        "service down": ('up{job="staticmoe"}',),
        "queue growing": ("staticmoe_num_requests_waiting", "deriv("),
        "p99 time to first token": ("histogram_quantile(0.99", "staticmoe_time_to_first_token_seconds_bucket"),
        "sustained expert imbalance": ("staticmoe_expert_load_imbalance",),
    }
    for need, fragments in by_need.items():
        matching = [r for r in rules.values() if all(f in r["expr"] for f in fragments)]
        assert matching, f"no alert rule for {need}"
        for rule in matching:
            assert rule["labels"]["severity"] in {"critical", "warning", "info"}
            assert re.fullmatch(r"\d+[smh]", rule["for"]), f"{rule['alert']} must be sustained ('for')"
            assert rule["annotations"]["summary"]
    imbalance = next(r for r in rules.values() if "expert_load_imbalance" in r["expr"])
    assert int(imbalance["for"][:-1]) >= 15 and imbalance["for"].endswith("m"), "imbalance must be sustained"


def test_dashboard_promql_parses(tmp_path):
    """promtool parses every Grafana expression, once its template variables are filled in."""
    exprs = [grafana_to_promql(e) for e in dashboard_exprs(load_dashboard()) if not is_label_values_query(e)]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"staticmoe:dashboard_expr_{i}", "expr": expr} for i, expr in enumerate(exprs)]}]}
    path = tmp_path / "dashboard_exprs.yml"
    path.write_text(yaml.safe_dump(rules))
    result = run([tool("promtool"), "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(exprs)} rules found" in result.stdout


# ---- Grafana --------------------------------------------------------------------------------------------------------


def test_grafana_dashboard_shows_what_operators_need():
    dashboard = load_dashboard()
    panels = [p for p in all_panels(dashboard) if p["type"] != "row"]
    exprs_of = {p["id"]: " ".join(t.get("expr", "") for t in p.get("targets", [])) for p in panels}

    def panels_with(*fragments):
        return [p for p in panels if all(f in exprs_of[p["id"]] for f in fragments)]

    assert panels_with("rate(staticmoe_generation_tokens_total"), "output tokens/s"
    assert panels_with("rate(staticmoe_request_success_total"), "requests/s"
    for histogram in ("staticmoe_time_to_first_token_seconds", "staticmoe_inter_token_latency_seconds"):
        assert panels_with("histogram_quantile(0.5", "histogram_quantile(0.99", histogram + "_bucket"), histogram
    assert panels_with("staticmoe_num_requests_running", "staticmoe_num_requests_waiting"), "running/waiting"
    assert panels_with("staticmoe_kv_cache_usage_perc"), "KV usage"
    assert panels_with("staticmoe_prefix_cache_hits_total", "staticmoe_prefix_cache_queries_total"), "hit rate"
    assert panels_with("staticmoe_moe_tensor_core_utilization", "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE"), \
        "our tensor-core utilization beside DCGM's tensor-pipe activity, in one panel"
    heatmaps = [p for p in panels_with("staticmoe_expert_tokens_total") if p["type"] == "heatmap"]
    assert heatmaps and "by (expert)" in exprs_of[heatmaps[0]["id"]], "per-expert load heatmap"
    assert [p for p in panels_with("staticmoe_expert_load_imbalance") if "layer" in exprs_of[p["id"]]]


def test_grafana_dashboard_is_well_formed():
    dashboard = load_dashboard()
    datasource_uid = load_yaml(GRAFANA_DATASOURCE)["datasources"][0]["uid"]
    panels = all_panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    occupied = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not cells & occupied, f"panel {panel['title']!r} overlaps another"
        occupied |= cells
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == datasource_uid, panel["title"]
            assert target["refId"]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    used = {v for e in dashboard_exprs(dashboard) for v in re.findall(r"\$(\w+)", e) if not v.startswith("__")}
    used |= {p["repeat"] for p in panels if p.get("repeat")}
    assert used <= variables, f"undefined template variables: {used - variables}"


def test_grafana_provisioning_matches_compose_mounts():
    compose = load_yaml(COMPOSE_FILE)
    grafana_mounts = dict(m.split(":")[:2] for m in compose["services"]["grafana"]["volumes"])
    datasource = load_yaml(GRAFANA_DATASOURCE)["datasources"][0]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    assert "prometheus" in compose["services"]
    provider = load_yaml(GRAFANA_PROVIDER)["providers"][0]
    assert grafana_mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert grafana_mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    home = compose["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{GRAFANA_DASHBOARD.name}"


# ---- dcgm-exporter --------------------------------------------------------------------------------------------------


def dcgm_fields() -> dict[str, str]:
    rows = [r for r in csv.reader(DCGM_COUNTERS.read_text().splitlines()) if r and not r[0].lstrip().startswith("#")]
    for row in rows:
        assert len(row) >= 3, f"dcgm-exporter wants 'field, type, help': {row}"
        assert re.fullmatch(r"DCGM_FI_[A-Z0-9_]+", row[0].strip()), row
        assert row[1].strip() in {"gauge", "counter", "label"}, row
    return {row[0].strip(): row[1].strip() for row in rows}


def test_dcgm_exports_tensor_pipe_activity_and_everything_the_dashboard_uses():
    fields = dcgm_fields()
    assert fields["DCGM_FI_PROF_PIPE_TENSOR_ACTIVE"] == "gauge"
    used = {n for e in dashboard_exprs(load_dashboard()) for n in metric_names(e) if n.startswith("DCGM_")}
    assert used and used <= fields.keys(), f"dashboard uses DCGM fields the exporter is not told to export: {used}"
    exporter = load_yaml(COMPOSE_FILE)["services"]["dcgm-exporter"]
    mounts = dict(m.split(":")[:2] for m in exporter["volumes"])
    assert mounts["./dcgm/counters.csv"] == exporter["environment"]["DCGM_EXPORTER_COLLECTORS"]
    assert "SYS_ADMIN" in exporter["cap_add"], "profiling fields need CAP_SYS_ADMIN"


# ---- docker compose -------------------------------------------------------------------------------------------------


def check_jsonschema(*args: str):
    return run([tool("check-jsonschema"), *args])


def test_compose_file_validates_against_the_compose_spec(tmp_path):
    result = check_jsonschema("--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE))
    assert result.returncode == 0, result.stdout + result.stderr
    broken = load_yaml(COMPOSE_FILE)
    broken["services"]["staticmoe"]["ports"] = {"http": 8000}  # ports must be a list
    (tmp_path / "compose.yml").write_text(yaml.safe_dump(broken))
    assert check_jsonschema("--builtin-schema", "vendor.compose-spec", str(tmp_path / "compose.yml")).returncode != 0


def test_compose_wires_the_stack_together():
    services = load_yaml(COMPOSE_FILE)["services"]
    assert {"staticmoe", "prometheus", "grafana", "dcgm-exporter"} <= services.keys()
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"
    server = services["staticmoe"]
    assert server["build"]["context"] == ".." and (DEPLOY / ".." / server["build"]["dockerfile"]).resolve() == DOCKERFILE
    assert any(v.endswith(":/models:ro") for v in server["volumes"]), "model mounted read-only at /models"
    assert server["environment"]["STATICMOE_MODEL"] == "/models"
    devices = server["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    prometheus_mounts = dict(m.split(":")[:2] for m in services["prometheus"]["volumes"])
    config_path = prometheus_mounts["./prometheus/prometheus.yml"]
    assert f"--config.file={config_path}" in services["prometheus"]["command"]
    config = load_yaml(PROMETHEUS_CONFIG)
    for rule_file in config["rule_files"]:
        assert prometheus_mounts[f"./prometheus/{rule_file}"] == f"/etc/prometheus/{rule_file}"
    targets = {job["job_name"]: job["static_configs"][0]["targets"][0] for job in config["scrape_configs"]}
    container_ports = {"staticmoe": server["environment"]["STATICMOE_PORT"], "dcgm-exporter": "9400"}
    for job, service in (("staticmoe", "staticmoe"), ("dcgm", "dcgm-exporter")):
        host, port = targets[job].split(":")
        assert host == service and port == container_ports[service], targets[job]


# ---- Kubernetes -----------------------------------------------------------------------------------------------------


def k8s_objects() -> dict[str, dict]:
    objects = {}
    for path in sorted(K8S_DIR.glob("*.yaml")):
        for doc in load_yaml_documents(path):
            objects[doc["kind"]] = doc
    return objects


@pytest.mark.parametrize("version", ["1.28.0", "latest"])
def test_k8s_core_manifests_validate_against_kubernetes_schemas(version):
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="run .ci/system-deps.sh")
    version = kubernetes_validate.latest_version() if version == "latest" else version
    core = [o for o in k8s_objects().values() if o["apiVersion"] != "monitoring.coreos.com/v1"]  # CRDs: below
    assert {o["kind"] for o in core} >= {"Deployment", "Service"}
    for obj in core:
        kubernetes_validate.validate(obj, version, strict=True)
    broken = yaml.safe_load(yaml.safe_dump(k8s_objects()["Deployment"]))
    broken["spec"]["template"]["spec"]["containers"][0]["startupProbe"]["periodSecond"] = 10  # misspelled key
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


def test_servicemonitor_validates_against_its_schema():
    jsonschema = pytest.importorskip("jsonschema", reason="run .ci/system-deps.sh")
    schema = yaml.safe_load((SCHEMAS / "servicemonitor.schema.json").read_text())
    monitor = k8s_objects()["ServiceMonitor"]
    jsonschema.validate(monitor, schema)
    broken = yaml.safe_load(yaml.safe_dump(monitor))
    broken["spec"]["endpoints"][0]["interval"] = "five seconds"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_prometheus_rule_carries_the_same_alerts_as_the_rule_file(tmp_path):
    rule = k8s_objects()["PrometheusRule"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["metadata"]["name"]
    assert rule["spec"]["groups"] == load_yaml(ALERT_RULES)["groups"], "deploy/k8s/prometheusrule.yaml is stale"
    extracted = tmp_path / "rules.yml"
    extracted.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    result = run([tool("promtool"), "check", "rules", str(extracted)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_k8s_objects_fit_together():
    objects = k8s_objects()
    deployment, service, monitor = objects["Deployment"], objects["Service"], objects["ServiceMonitor"]
    pod = deployment["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items(), "Service must select the pods"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert deployment["spec"]["replicas"] >= 2, "scale out by replicas behind the Service"
    if "PodDisruptionBudget" in objects:
        assert objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

    container = pod["spec"]["containers"][0]
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert port_names["http"] == int(env["STATICMOE_PORT"])
    assert {p["name"] for p in service["spec"]["ports"]} >= {e["port"] for e in monitor["spec"]["endpoints"]}
    assert all(p["targetPort"] in port_names for p in service["spec"]["ports"])
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"

    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    for probe, path in (("startupProbe", "/health"), ("readinessProbe", "/ready"), ("livenessProbe", "/health")):
        spec = container[probe]
        assert spec["httpGet"]["path"] == path and spec["httpGet"]["port"] in port_names, probe
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "allow >= 10 min to load a large model"
    readiness, liveness = container["readinessProbe"], container["livenessProbe"]
    assert readiness["periodSeconds"] * readiness["failureThreshold"] < 30, "leave the Service quickly when draining"
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 60, "do not kill a pod on a short hiccup"

    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/models"]["readOnly"] is True and env["STATICMOE_MODEL"] == "/models"
    models_volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mounts["/models"]["name"])
    assert models_volume["persistentVolumeClaim"]["readOnly"] is True
    security = pod["spec"]["securityContext"]
    final_stage = dockerfile_stages(DOCKERFILE.read_text())[-1]
    image_user = [args for instruction, args in final_stage if instruction == "USER"][-1]
    assert security["runAsNonRoot"] is True and f"{security['runAsUser']}:{security['runAsGroup']}" == image_user


# ---- fail-closed defaults (issue 17 items 8, 10) ----------------------------------------------------------------------
_VARIABLE = re.compile(r"\$\{(\w+)(?::([?-])([^}]*))?\}")


def compose_value(text: str, env: dict[str, str]) -> str:
    """docker compose's interpolation of ${VAR}, ${VAR:-default} and ${VAR:?error} (an unset or empty VAR with :?
    stops compose with the error)."""
    def one(match: re.Match) -> str:
        name, kind, arg = match.groups()
        value = env.get(name, "")
        if kind == "?" and not value:
            raise ValueError(f"{name}: {arg}")
        return value or (arg if kind == "-" else "")

    return _VARIABLE.sub(one, str(text))


def all_deployments() -> list[dict]:
    return [d for path in (K8S_DIR / "deployment.yaml", K8S_DIR / "multi-gpu" / "deployment.yaml")
            for d in load_yaml_documents(path) if d["kind"] == "Deployment"]


def test_compose_fails_closed_without_keys_and_keeps_monitoring_on_loopback():
    services = load_yaml(COMPOSE_FILE)["services"]
    env = {"STATICMOE_MODEL_DIR": "/models", "STATICMOE_API_KEY": "k", "GRAFANA_ADMIN_PASSWORD": "p"}
    for missing in ("STATICMOE_API_KEY", "GRAFANA_ADMIN_PASSWORD"):
        partial = {k: v for k, v in env.items() if k != missing}
        with pytest.raises(ValueError, match=missing):
            for service in services.values():
                for value in (service.get("environment") or {}).values():
                    compose_value(value, partial)
    grafana = {k: compose_value(v, env) for k, v in services["grafana"]["environment"].items()}
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"] == "p"
    assert grafana.get("GF_AUTH_ANONYMOUS_ENABLED", "false") == "false"
    assert "GF_AUTH_ANONYMOUS_ORG_ROLE" not in grafana
    for name in ("prometheus", "grafana", "dcgm-exporter"):
        for port in services[name].get("ports", []):
            assert compose_value(port, env).startswith("127.0.0.1:"), (name, port)


def test_k8s_api_key_secret_is_required():
    for deployment in all_deployments():
        env = {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
        ref = env["STATICMOE_API_KEY"]["valueFrom"]["secretKeyRef"]
        assert ref.get("optional", False) is False, deployment["metadata"]["name"]


def test_drain_ends_within_the_grace_period():
    """--drain-timeout (plus the preStop sleep and a margin to shut down) must end before the SIGKILL, so streams
    still running get their in-band end; the default used to be 600 s against a 120 s grace."""
    from service.cli import build_parser

    default_drain = build_parser().parse_args(["serve"]).drain_timeout
    shutdown_margin_s = 15  # ending the streams, uvicorn's graceful close, joining the engine thread
    for deployment in all_deployments():
        pod = deployment["spec"]["template"]["spec"]
        container = pod["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}
        drain = float(env.get("STATICMOE_DRAIN_TIMEOUT") or default_drain)
        pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
        pre_stop_s = float(pre_stop[1]) if pre_stop[:1] == ["sleep"] else 0.0
        assert pre_stop_s + drain + shutdown_margin_s <= pod["terminationGracePeriodSeconds"], \
            deployment["metadata"]["name"]
    staticmoe = load_yaml(COMPOSE_FILE)["services"]["staticmoe"]
    grace = staticmoe["stop_grace_period"]
    grace_s = float(grace[:-1]) * {"s": 1, "m": 60}[grace[-1]]
    drain = float(staticmoe["environment"].get("STATICMOE_DRAIN_TIMEOUT") or default_drain)
    assert drain + shutdown_margin_s <= grace_s
