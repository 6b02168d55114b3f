"""Headless Chromium (through selenium) for the tests of the built-in dashboard page, and a loopback server that
serves the real page next to a /metrics endpoint answering with given exposition texts."""

from __future__ import annotations

import contextlib
import http.server
import threading

import pytest

from tests.deploy_fixtures import tool


def chromium_driver(tmp_path):
    """A headless Chromium session, or skip where selenium, chromium or chromedriver is missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium missing: run .ci/system-deps.sh")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = tool("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1000", f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=tool("chromedriver")), options=options)


@contextlib.contextmanager
def dashboard_with_scrapes(*scrapes: str):
    """Serve service.dashboard's page at /dashboard (with the route's Content-Security-Policy) on 127.0.0.1, and a
    /metrics that answers the given exposition texts in order, the last one repeated. Yields the base URL."""
    from service import dashboard

    assert scrapes, "at least one /metrics text"
    page = dashboard.dashboard_page().encode()
    served = {"metrics": 0}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            path = self.path.split("?", 1)[0]
            if path == "/dashboard":
                body, content_type = page, "text/html; charset=utf-8"
            elif path == "/metrics":
                body = scrapes[min(served["metrics"], len(scrapes) - 1)].encode()
                served["metrics"] += 1
                content_type = "text/plain; version=0.0.4; charset=utf-8"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Content-Security-Policy", dashboard.CONTENT_SECURITY_POLICY)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def render_in_chromium(tmp_path, *scrapes: str, element_ids: tuple[str, ...], timeout: float = 30) -> dict[str, str]:
    """Load the real dashboard in headless Chromium against the given /metrics texts (the last repeated); once the
    page has rendered at least len(scrapes) polls (so every element shows the last scrape), return the text of the
    given elements, read in one script so they come from the same render."""
    driver = chromium_driver(tmp_path)
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        with dashboard_with_scrapes(*scrapes) as base_url:
            driver.get(base_url + "/dashboard?interval=250")
            read = ("const ids = arguments[0];"
                    "const polls = Number(document.getElementById('status').dataset.polls || 0);"
                    "return [polls, Object.fromEntries(ids.map((id) => [id, document.getElementById(id).textContent]))];")

            def rendered(d):
                polls, texts = d.execute_script(read, list(element_ids))
                return texts if polls >= len(scrapes) else False

            shown = WebDriverWait(driver, timeout, poll_frequency=0.1).until(
                rendered, message=f"the dashboard did not render {len(scrapes)} polls of /metrics in {timeout} s")
            errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
            assert not errors, errors
            return shown
    finally:
        driver.quit()
