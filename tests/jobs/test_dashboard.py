"""The ``/dashboard`` page: route unit tests, and a real headless Chromium watching it update live."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import trio

from ocf.jobs import dashboard
from ocf.node import open_node

from .cdp import Page, open_browser

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]
PROJECT = {
    "stages": [
        {"name": "crawl", "lease_timeout": 30},
        {"name": "embed", "lease_timeout": 30},
        {"name": "filter", "lease_timeout": 30},
    ],
    "max_attempts": 1,
}
# A user name that would run script if the page ever parsed data as HTML.
HOSTILE_USER = '<img src=x onerror="window.pwned=1">'


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def register(
    client: httpx.AsyncClient, project: str, stage: str, nickname: str, user: str | None = None
) -> dict[str, Any]:
    body = {"nickname": nickname, "stage": stage, **({"user": user} if user else {})}
    r = await client.post(f"/v1/jobs/{project}/workers", json=body)
    assert r.status_code == 201, r.text
    return r.json()


async def work(
    client: httpx.AsyncClient, project: str, token: str, complete: int, fail: int = 0, error: str = "boom"
) -> None:
    """Claim ``complete + fail`` jobs and finish them over HTTP, as a worker would."""
    r = await client.post(f"/v1/jobs/{project}/claim", json={"max": complete + fail}, headers=auth(token))
    jobs = r.json()["jobs"]
    assert len(jobs) == complete + fail, r.text
    if complete:
        r = await client.post(
            f"/v1/jobs/{project}/complete",
            json={"results": [{"id": j["id"], "output": {"from": j["input"]}} for j in jobs[:complete]]},
            headers=auth(token),
        )
        assert [x["status"] for x in r.json()["results"]] == ["done"] * complete, r.text
    for job in jobs[complete:]:
        r = await client.post(f"/v1/jobs/{project}/jobs/{job['id']}/fail", json={"error": error}, headers=auth(token))
        assert r.status_code == 200, r.text


# --- route unit tests -------------------------------------------------------------------------


async def test_dashboard_is_html_with_only_local_assets(node_config):
    async with (
        open_node(node_config(jobs=True)) as node,
        httpx.AsyncClient(base_url=node.gateway_url, headers={"X-OCF-Admin-Token": node.admin_token}) as client,
    ):
        r = await client.get("/dashboard")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in r.headers["content-security-policy"]
        referenced = re.findall(r'(?:src|href)="([^"]+)"', r.text)
        assert "/dashboard/static/dashboard.js" in referenced and "/dashboard/static/dashboard.css" in referenced
        bodies = {"index.html": r.text}
        for name, kind in (("dashboard.js", "javascript"), ("dashboard.css", "text/css")):
            asset = await client.get(f"/dashboard/static/{name}")
            assert asset.status_code == 200 and kind in asset.headers["content-type"]
            bodies[name] = asset.text
        for name, text in bodies.items():
            # No CDN, fonts or trackers: the only absolute URL allowed is the SVG namespace name.
            urls = set(re.findall(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}[^\s\"')]*", text, re.I)) - {
                "http://www.w3.org/2000/svg"
            }
            assert not urls, f"{name} references other hosts: {urls}"
            assert "@import" not in text and "innerHTML" not in text and "insertAdjacentHTML" not in text


async def test_unknown_asset_and_traversal_are_404(node_config):
    async with (
        open_node(node_config(jobs=True)) as node,
        httpx.AsyncClient(base_url=node.gateway_url, headers={"X-OCF-Admin-Token": node.admin_token}) as client,
    ):
        for path in (
            "/dashboard/static/nope.js",
            "/dashboard/static/index.html",
            "/dashboard/static/..%2Fdashboard.py",
            "/dashboard/static/../dashboard.py",
        ):
            r = await client.get(path)
            # An encoded '/' is a non-canonical target: the router refuses it before any view runs.
            assert r.status_code == (400 if "%2F" in path else 404), path
            assert r.headers["content-type"].startswith("application/json")


async def test_project_query_selects_or_explains(node_config):
    async with (
        open_node(node_config(jobs=True)) as node,
        httpx.AsyncClient(base_url=node.gateway_url, headers={"X-OCF-Admin-Token": node.admin_token}) as client,
    ):
        assert (await client.put("/v1/jobs/crawl", json=PROJECT)).status_code == 201
        assert (await client.get("/dashboard", params={"project": "crawl"})).status_code == 200
        # Unknown project: an honest 404, still the page (its script says which projects exist).
        r = await client.get("/dashboard", params={"project": "<nope>"})
        assert r.status_code == 404 and r.headers["content-type"].startswith("text/html")
        assert "<nope>" not in r.text  # the server never echoes the name into HTML
        assert "/dashboard/static/dashboard.js" in r.text


async def test_node_without_tracker_serves_the_explaining_page(node_config):
    async with (
        open_node(node_config()) as node,
        httpx.AsyncClient(base_url=node.gateway_url, headers={"X-OCF-Admin-Token": node.admin_token}) as client,
    ):
        r = await client.get("/dashboard")
        assert r.status_code == 404 and r.headers["content-type"].startswith("text/html")
        api = await client.get("/v1/jobs")
        assert api.status_code == 404 and api.json()["error"]["code"] == "no_tracker"


def test_assets_ship_as_package_data():
    for name in [dashboard.PAGE, *dashboard.ASSETS]:
        assert len(dashboard.read_asset(name)) > 500, name


# --- real browser ------------------------------------------------------------------------------

# Everything the page shows for a project, read back from the DOM (text, not internal state).
READ_PAGE = r"""
(() => {
  const n = (el) => el === null ? null : Number(el.textContent.replace(/,/g, ""));
  const stages = {};
  for (const row of document.querySelectorAll("#stages [data-stage]")) {
    const f = {};
    for (const name of ["done", "failed", "leased", "pending", "total", "expected", "workers_active"]) {
      f[name] = n(row.querySelector(`[data-field="${name}"]`));
    }
    f.progress = row.querySelector('[data-field="progress"]').textContent;
    stages[row.dataset.stage] = f;
  }
  const board = {};
  for (const kind of ["users", "workers"]) {
    board[kind] = {};
    for (const tr of document.querySelectorAll(`#board-${kind} tbody tr[data-name]`)) {
      board[kind][tr.dataset.name] = {
        shown: tr.querySelector("td.name").textContent,
        total: n(tr.querySelector('[data-field="total"]')),
        total_24h: n(tr.querySelector('[data-field="total_24h"]')),
      };
    }
  }
  return {
    stages,
    board,
    completion: document.getElementById("completion").textContent,
    eta: document.getElementById("eta").textContent,
    workers_active: n(document.getElementById("workers-active")),
    workers_total: n(document.getElementById("workers-total")),
    results: n(document.getElementById("results")),
    throughput_total: n(document.getElementById("throughput-total")),
    throughput_bars: document.querySelectorAll("#throughput svg g[data-minute]").length,
    failures: [...document.querySelectorAll("#failures tbody td.error")].map((td) => td.textContent),
    live: document.getElementById("live").dataset.state,
    message_hidden: document.getElementById("message").hidden,
    pwned: window.pwned === 1,
  };
})()
"""


def expected_view(stats: dict[str, Any], board: dict[str, Any]) -> dict[str, Any]:
    """What the page must show, computed from the API's own JSON."""
    fields = ("done", "failed", "leased", "pending", "total", "expected", "workers_active")
    return {
        "stages": {
            s["name"]: {**{f: s[f] for f in fields}, "progress": f"{s['progress'] * 100:.1f}%"} for s in stats["stages"]
        },
        "completion": f"{stats['completion'] * 100:.1f}%",
        "workers_active": stats["workers"]["active"],
        "workers_total": stats["workers"]["total"],
        "results": stats["results"],
        "throughput_total": sum(sum(m["completed"]) for m in stats["throughput"]),
        "failures": [f["error"] for f in stats["recent_failures"]],
        "board": {
            kind: {
                r["name"]: {"shown": r["name"], "total": r["total"], "total_24h": r["total_24h"]} for r in board[kind]
            }
            for kind in ("users", "workers")
        },
    }


def shown_part(page: dict[str, Any]) -> dict[str, Any]:
    return {
        k: page[k]
        for k in (
            "stages",
            "completion",
            "workers_active",
            "workers_total",
            "results",
            "throughput_total",
            "failures",
            "board",
        )
    }


async def settled_view(page: Page, client: httpx.AsyncClient, project: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Poll (for 10 s) until the page shows what the API says (the browser is external: nothing to await on)."""
    last: dict[str, Any] = {}
    try:
        with trio.fail_after(10):
            while True:
                stats = (await client.get(f"/v1/jobs/{project}/stats")).json()
                board = (await client.get(f"/v1/jobs/{project}/leaderboard")).json()
                want = expected_view(stats, board)
                last = await page.evaluate(READ_PAGE)
                if shown_part(last) == want:
                    return last, stats
                await trio.sleep(0.1)
    except trio.TooSlowError:
        raise AssertionError(f"page never matched the API:\n page: {shown_part(last)}\n  api: {want}") from None


def artifact_path() -> Path:
    directory = Path(os.environ.get("OCF_TEST_ARTIFACTS") or REPO / "test-artifacts")
    directory.mkdir(parents=True, exist_ok=True)
    return directory / "dashboard.png"


def chromium_processes(profile: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(str(profile) in arg for arg in proc.info["cmdline"] or ()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


@pytest.mark.browser
@pytest.mark.timeout(60)
async def test_dashboard_renders_and_updates_live_in_chromium(node_config, tmp_path):
    profile = tmp_path / "chromium-profile"
    project = "laion"
    async with (
        open_node(node_config(jobs=True)) as node,
        httpx.AsyncClient(base_url=node.gateway_url, headers={"X-OCF-Admin-Token": node.admin_token}) as client,
    ):
        assert (await client.put(f"/v1/jobs/{project}", json=PROJECT)).status_code == 201
        assert (await client.post(f"/v1/jobs/{project}/jobs", json=[f"url-{i}" for i in range(12)])).status_code == 201
        crawler = await register(client, project, "crawl", "alice")
        await work(client, project, crawler["token"], complete=5, fail=1, error="<b>timeout</b> & reset")
        embedder = await register(client, project, "embed", "mallory", user=HOSTILE_USER)
        await work(client, project, embedder["token"], complete=2)
        # A second project makes the page offer a chooser; ?project= must pick ours.
        assert (await client.put("/v1/jobs/other", json={"stages": ["only"]})).status_code == 201

        async with open_browser(profile) as page:
            await page.navigate(f"{node.gateway_url}/dashboard?project={project}")
            await page.wait_for(
                "document.getElementById('main') && !document.getElementById('main').hidden && "
                "document.querySelectorAll('#stages [data-stage]').length === 3"
            )
            shown, stats = await settled_view(page, client, project)
            assert [s["done"] for s in stats["stages"]] == [5, 2, 0] and stats["stages"][0]["failed"] == 1
            # The tracker prefixes the worker's name; the markup must show as text.
            assert len(shown["failures"]) == 1 and shown["failures"][0].endswith(
                f"{crawler['name']}: <b>timeout</b> & reset"
            )
            assert shown["board"]["users"][HOSTILE_USER]["total"] == 2 and not shown["pwned"]
            assert shown["throughput_bars"] == 60 and shown["message_hidden"]
            await page.wait_for(
                "document.querySelectorAll('#projects a').length >= 2"
            )  # the chooser is filled by its own fetch
            assert await page.evaluate("[...document.querySelectorAll('#projects a')].map(a => a.textContent)") == [
                "laion",
                "other",
            ]
            await page.wait_for("document.getElementById('live').dataset.state === 'live'")

            # Live: more work over HTTP shows up through the event stream, without a reload.
            await page.evaluate("window.__beforeUpdate = performance.timeOrigin")
            updates_before = int(await page.evaluate("document.getElementById('main').dataset.updates"))
            await work(client, project, crawler["token"], complete=4)
            await work(client, project, embedder["token"], complete=3)
            filterer = await register(client, project, "filter", "alice")
            await work(client, project, filterer["token"], complete=2)
            shown, stats = await settled_view(page, client, project)
            assert [s["done"] for s in stats["stages"]] == [9, 5, 2] and shown["results"] == 2
            assert shown["board"]["users"]["alice"]["total"] == 11
            assert await page.evaluate("window.__beforeUpdate === performance.timeOrigin")
            assert await page.evaluate("performance.getEntriesByType('navigation').length") == 1
            assert int(await page.evaluate("document.getElementById('main').dataset.updates")) > updates_before

            png = await page.screenshot()
            artifact_path().write_bytes(png)
            assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000
            assert page.errors() == []
            assert not shown["pwned"]
    assert chromium_processes(profile) == [], "chromium processes outlived the test"


@pytest.mark.browser
@pytest.mark.timeout(60)
async def test_dashboard_explains_missing_tracker_project_or_projects(node_config, tmp_path):
    message = "(() => { const m = document.getElementById('message'); return m && !m.hidden && m.textContent; })()"
    async with (
        open_node(node_config()) as bare,
        open_node(node_config(jobs=True)) as tracker,
        open_browser(tmp_path / "profile") as page,
    ):
        await page.navigate(f"{bare.gateway_url}/dashboard")
        assert "does not host a job tracker" in await page.wait_for(message)
        await page.navigate(f"{tracker.gateway_url}/dashboard")
        assert "No projects yet" in await page.wait_for(message)
        async with httpx.AsyncClient(
            base_url=tracker.gateway_url, headers={"X-OCF-Admin-Token": tracker.admin_token}
        ) as client:
            assert (await client.put("/v1/jobs/crawl", json=PROJECT)).status_code == 201
        await page.navigate(f"{tracker.gateway_url}/dashboard?project=%3Cb%3Enope%3C%2Fb%3E")
        text = await page.wait_for(message)
        assert 'No project named "<b>nope</b>"' in text and "crawl" in text
        assert await page.evaluate("document.querySelectorAll('#message b').length") == 0
        # Without ?project= the only project is shown.
        await page.navigate(f"{tracker.gateway_url}/dashboard")
        await page.wait_for("document.querySelectorAll('#stages [data-stage]').length === 3")
        assert await page.evaluate("document.getElementById('project-name').textContent") == "crawl"
        # The deliberate 404s (page and API) are logged as failed loads; nothing else may be.
        assert [e for e in page.errors() if not (e.startswith("log (network)") and "status of 404" in e)] == []
