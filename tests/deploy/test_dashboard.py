"""The built-in dashboard: its route and assets (TestClient), and the page itself in a real headless Chromium.

The browser test needs Debian's `chromium` and `chromium-driver` (installed by .ci/run) and `selenium` (the `test`
extra); nothing is downloaded at test time. Without them it skips and says why.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import httpx
import pytest

from .conftest import REPO, EntrypointServer, png_bytes, which

STATIC = REPO / "service" / "api" / "static"
API_KEY = "dashboard-test-key-3f9a"


# --- route and assets (no browser) -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from fastapi.testclient import TestClient

    from service.api.app import create_app
    from service.settings import Settings

    tmp = tmp_path_factory.mktemp("dashboard-route")
    settings = Settings(model_store=tmp / "empty-store", device="cpu", results_path=tmp / "results.sqlite",
                        thresholds_path=tmp / "thresholds.json", api_keys_read=[API_KEY])
    with TestClient(create_app(settings)) as c:
        yield c


def test_dashboard_page_needs_no_key_and_has_a_strict_csp(client):
    r = client.get("/dashboard")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "img-src 'self' blob:" in csp and "default-src 'none'" in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    assert 'src="dashboard/static/dashboard.js"' in r.text and 'href="dashboard/static/dashboard.css"' in r.text
    # ... while the data it shows does need the key
    assert client.get("/v1/results").status_code == 401
    assert client.get("/v1/results", headers={"X-API-Key": API_KEY}).status_code == 200


@pytest.mark.parametrize("name, ctype", [("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")])
def test_assets_are_served_with_their_types(client, name, ctype):
    r = client.get(f"/dashboard/static/{name}")
    assert r.status_code == 200 and r.headers["content-type"].startswith(ctype)
    assert r.content == (STATIC / name).read_bytes()


@pytest.mark.parametrize("name", ["nope.js", "..%2Fapp.py", "..%2F..%2Fsettings.py", "dashboard.py", ".hidden.js"])
def test_only_existing_static_assets_are_served(client, name):
    r = client.get(f"/dashboard/static/{name}")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"


def test_dashboard_is_not_in_the_openapi_document(client):
    assert not [p for p in client.get("/openapi.json").json()["paths"] if p.startswith("/dashboard")]


def test_static_files_load_nothing_from_outside():
    """No CDN, no external fonts or scripts: every URL in the page and its assets is relative to the service."""
    files = sorted(STATIC.iterdir())
    assert {f.name for f in files} >= {"dashboard.html", "dashboard.js", "dashboard.css"}
    for f in files:
        text = f.read_text()
        external = [u for u in re.findall(r"(?:https?:)?//[A-Za-z0-9.-]+\.[A-Za-z]{2,}[^\s'\")]*", text)
                    if not u.startswith("//www.w3.org/2000/svg") and "www.w3.org/2000/svg" not in u]
        assert not external, f"{f.name} references {external}"
        assert "@import" not in text and "<iframe" not in text
    js = (STATIC / "dashboard.js").read_text()
    assert "sessionStorage" in js and "X-API-Key" in js and "createObjectURL" in js
    assert "innerHTML" not in js, "build the DOM with textContent: result fields are user data"


# --- the page in a real browser ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(deploy_store, tmp_path_factory):
    """The real app started through the container entrypoint, keys from a file as a Docker secret would give them."""
    tmp = tmp_path_factory.mktemp("dashboard-server")
    keys = tmp / "read-keys"
    keys.write_text(f"# read keys\n{API_KEY}\n")
    env = {"ZSAD_MODEL_STORE": str(deploy_store), "ZSAD_DEVICE": "cpu", "ZSAD_PRECISION": "fp32",
           "ZSAD_RESULTS_PATH": str(tmp / "results.sqlite"), "ZSAD_THRESHOLDS_PATH": str(tmp / "thresholds.json"),
           "ZSAD_MAX_BATCH_WAIT_MS": "2", "ZSAD_API_KEYS_READ_FILE": str(keys)}
    srv = EntrypointServer(env, tmp / "server.log").start()
    try:
        yield srv
    finally:
        srv.stop()


def test_entrypoint_server_reads_keys_from_file_and_healthcheck_passes(server):
    assert httpx.get(server.url + "/v1/models", timeout=10).status_code == 401
    assert httpx.get(server.url + "/v1/models", headers={"X-API-Key": API_KEY}, timeout=10).status_code == 200
    env = {**os.environ, "ZSAD_PORT": str(server.port)}
    check = subprocess.run([sys.executable, str(REPO / "docker" / "healthcheck.py")], env=env, capture_output=True,
                           text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr


def _chromium() -> tuple[str, str]:
    browser = which("chromium") or which("chromium-browser")
    driver = which("chromedriver")
    if not browser or not driver:
        pytest.skip("headless browser test needs Debian's chromium and chromium-driver "
                    "(apt-get install chromium chromium-driver; .ci/run installs them)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.skip("headless browser test needs selenium (pip install -e '.[test]')")
    return browser, driver


@pytest.fixture()
def browser(tmp_path, monkeypatch):
    browser_path, driver_path = _chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must never try to download a browser or driver
    opts = Options()
    opts.binary_location = browser_path
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,1400", f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    opts.set_capability("unhandledPromptBehavior", "ignore")  # the test answers the API-key prompt itself
    service = Service(executable_path=driver_path, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=opts, service=service)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _detect(server, line: str, seed: int) -> dict:
    r = httpx.post(server.url + "/v1/detect", files={"file": (f"{line}.png", png_bytes(seed), "image/png")},
                   data={"line": line, "product": "widget", "heatmap": "png"}, headers={"X-API-Key": API_KEY},
                   timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["heatmap_url"] == f"/v1/results/{body['id']}/heatmap.png"
    return body


def test_dashboard_shows_results_per_line_with_heatmap_overlays(server, browser, tmp_path):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    first = _detect(server, "line-a", 1)
    second = _detect(server, "line-b", 2)
    ids = [first["id"], second["id"]]

    browser.get(server.url + "/dashboard?interval=1000")
    try:
        # The first data call answers 401: the page asks for the key once.
        alert = WebDriverWait(browser, 20).until(EC.alert_is_present())
        assert "API key" in alert.text
        alert.send_keys(API_KEY)
        alert.accept()

        loaded = """
            return arguments[0].every(function (id) {
              var fig = document.querySelector('figure.result[data-result-id="' + id + '"]');
              var img = fig && fig.querySelector('img.heatmap');
              return !!img && img.complete && img.naturalWidth > 0;
            });"""
        WebDriverWait(browser, 30, poll_frequency=0.2).until(lambda d: d.execute_script(loaded, ids))
    except TimeoutException:
        browser.save_screenshot(str(tmp_path / "dashboard.png"))
        logs = [e["message"] for e in browser.get_log("browser")]
        status = browser.execute_script("var s = document.getElementById('status'); return s && s.textContent;")
        pytest.fail(f"dashboard did not show both results: status={status!r} console={logs} "
                    f"server log={server.log()} screenshot={tmp_path / 'dashboard.png'}")

    for rid, line in zip(ids, ("line-a", "line-b")):
        info = browser.execute_script("""
            var fig = document.querySelector('figure.result[data-result-id="' + arguments[0] + '"]');
            var img = fig.querySelector('img.heatmap');
            return {line: fig.closest('section.line').getAttribute('data-line'), src: img.src,
                    w: img.naturalWidth, h: img.naturalHeight, text: fig.textContent};""", rid)
        assert info["line"] == line
        assert info["src"].startswith("blob:"), "the overlay must come through fetch + blob URL (it needs the key)"
        assert info["w"] == 96 and info["h"] == 72, info  # the overlay has the uploaded image's geometry
        assert f"#{rid}" in info["text"]

        assert "uncalibrated" in info["text"]  # product widget was never calibrated: every card says so

    # ... and the page lists it with the one thing to do
    deadline = time.time() + 10
    while time.time() < deadline and browser.execute_script("return document.getElementById('uncalibrated').hidden"):
        time.sleep(0.2)
    hint = browser.find_element("id", "uncalibrated-list").text
    assert "widget" in hint and "POST /v1/calibrate/widget" in hint, hint
    assert browser.execute_script("return sessionStorage.getItem('zsad.apiKey');") == API_KEY
    model = browser.find_element("id", "model").text
    assert f"{first['model']['name']}@{first['model']['version']}" in model
    assert browser.find_element("id", "s-threshold").text not in ("", "–")
    deadline = time.time() + 10  # the chart draws a line per series once results are in the window
    while time.time() < deadline and not browser.execute_script(
            "return document.querySelectorAll('#chart path.series').length"):
        time.sleep(0.2)
    assert browser.execute_script("return document.querySelectorAll('#chart path.series').length") >= 1
    errors = [e for e in browser.get_log("browser")
              if e["level"] == "SEVERE" and "favicon" not in e["message"] and " 401 " not in e["message"]]
    assert not errors, errors  # no CSP violations, no script errors


def test_api_docs_render_in_a_browser_with_no_internet(server, browser, tmp_path):
    """Swagger UI builds the page from the vendored bundle and the service's own /openapi.json."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server.url + "/docs")
    rendered = """
        var title = document.querySelector('.swagger-ui .info .title');
        var paths = Array.prototype.map.call(document.querySelectorAll('.opblock-summary-path'),
                                             function (e) { return e.getAttribute('data-path'); });
        return title ? {title: title.textContent, paths: paths} : null;"""
    try:
        info = WebDriverWait(browser, 30, poll_frequency=0.2).until(
            lambda d: (lambda r: r if r and r["paths"] else None)(d.execute_script(rendered)))
    except TimeoutException:
        browser.save_screenshot(str(tmp_path / "docs.png"))
        pytest.fail(f"Swagger UI did not render: console={[e['message'] for e in browser.get_log('browser')]}")
    assert info["title"].startswith("zsad")
    assert {"/v1/detect", "/v1/results", "/metrics"} <= set(info["paths"])
    failed = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not failed, failed
