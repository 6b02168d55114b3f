"""Helpers of the deployment tests: file locations, external tools, Dockerfile parsing, metric names in PromQL."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
DEPLOY = REPO_ROOT / "deploy"
DOCKERFILE = REPO_ROOT / "Dockerfile"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
ALERT_RULES = DEPLOY / "prometheus" / "alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts.test.yml"
GRAFANA_DASHBOARD = DEPLOY / "grafana" / "dashboards" / "staticmoe.json"
GRAFANA_DATASOURCE = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
GRAFANA_PROVIDER = DEPLOY / "grafana" / "provisioning" / "dashboards" / "staticmoe.yml"
DCGM_COUNTERS = DEPLOY / "dcgm" / "counters.csv"
K8S_DIR = DEPLOY / "k8s"
HEALTHCHECK_SCRIPT = DEPLOY / "docker" / "healthcheck.py"
DASHBOARD_HTML = REPO_ROOT / "service" / "static" / "dashboard.html"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
ARTIFACTS = REPO_ROOT / "test-artifacts"
INSTALL_COMMAND = "pip install --no-build-isolation --no-deps ."


def tool(name: str) -> str:
    """Path of a command-line tool (PATH or this interpreter's bin/), or skip: .ci/system-deps.sh installs them all."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip(f"{name} is not installed; run .ci/system-deps.sh (CI does) to install it")
    return found


def run(command: list[str], timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def load_yaml_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def load_dashboard() -> dict:
    return json.loads(GRAFANA_DASHBOARD.read_text())


# ---- metric names ---------------------------------------------------------------------------------------------------
# Our metrics all carry the staticmoe_ prefix; the hardware counters come from dcgm-exporter as DCGM_FI_*.
METRIC_NAME = re.compile(r"\b((?:staticmoe|DCGM_FI)_[A-Za-z0-9_]+)\b")


def metric_names(text: str) -> set[str]:
    return set(METRIC_NAME.findall(text))


def all_panels(dashboard: dict) -> list[dict]:
    """Every panel, rows' nested panels included."""
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def dashboard_exprs(dashboard: dict) -> list[str]:
    exprs = [t["expr"] for p in all_panels(dashboard) for t in p.get("targets", []) if t.get("expr")]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def rule_exprs(rules: dict) -> list[str]:
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def grafana_to_promql(expr: str) -> str:
    """A Grafana target as plain PromQL: template variables match everything, $__rate_interval becomes 1m."""
    expr = re.sub(r'=~?"\$\{?\w+\}?"', '=~".*"', expr)
    return expr.replace("$__rate_interval", "1m").replace("$__interval", "15s")


def is_label_values_query(expr: str) -> bool:
    return expr.startswith("label_values(")


# ---- Dockerfile -----------------------------------------------------------------------------------------------------
def dockerfile_stages(text: str) -> list[list[tuple[str, str]]]:
    """[[(INSTRUCTION, arguments), ...] per stage]; comments dropped, continuation lines joined."""
    logical, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        logical.append(current + stripped)
        current = ""
    stages: list[list[tuple[str, str]]] = [[]]
    for line in logical:
        instruction, _, arguments = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            stages.append([])
        stages[-1].append((instruction, " ".join(arguments.split())))
    return stages  # stages[0] holds the global ARGs before the first FROM
