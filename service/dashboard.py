"""GET /dashboard: the built-in live dashboard for users without Grafana.

One self-contained HTML page (inline CSS and JS, canvas drawing, no CDN). It polls this server's own /metrics,
parses the Prometheus text format in the browser and shows output tokens/s, latency percentiles, MoE tensor-core
utilization and a per-expert load heatmap. The Content-Security-Policy lets it reach nothing but this origin.
"""

import functools
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

DASHBOARD_HTML = Path(__file__).resolve().parent / "static" / "dashboard.html"

# The page may only talk to the origin that served it; inline script/style because the page is one file.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

router = APIRouter()


@functools.cache
def dashboard_page() -> str:
    if not DASHBOARD_HTML.is_file():
        raise RuntimeError(f"dashboard page missing from the installed package: {DASHBOARD_HTML}")
    return DASHBOARD_HTML.read_text(encoding="utf-8")


@router.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
def dashboard() -> HTMLResponse:
    return HTMLResponse(
        dashboard_page(),
        headers={"Cache-Control": "no-cache", "Content-Security-Policy": CONTENT_SECURITY_POLICY},
    )
