"""The dashboard has data at first paint: server-rendered first view, then live.

A real headless Chromium loads the page and, right after the load event (and
once with JavaScript disabled altogether), the worker list and the numbers
are on the page and in its screenshot; the screenshot of the loaded page
carries far more than an empty page's.
"""

from __future__ import annotations

import httpx
import pytest

from ocf.node import open_node

from .cdp import open_browser
from .test_dashboard import HOSTILE_USER, PROJECT, artifact_path, register, work

pytestmark = pytest.mark.timeout(120)

READ_FIRST_VIEW = r"""
(() => ({
  ready: document.readyState,
  hidden: document.getElementById("main").hidden,
  completion: document.getElementById("completion").textContent,
  results: document.getElementById("results").textContent,
  active: document.getElementById("workers-active").textContent,
  done: [...document.querySelectorAll('#stages [data-stage] [data-field="done"]')].map((b) => b.textContent),
  workers: [...document.querySelectorAll("#workers tbody tr[data-name]")].map((tr) => ({
    name: tr.dataset.name,
    link: tr.querySelector("a").getAttribute("href"),
    user: tr.children[1].textContent,
    current: tr.querySelector('[data-field="current"]').textContent,
    progress: tr.querySelector(".progress").textContent,
    done: tr.querySelector('[data-field="done"]').textContent,
  })),
  updates: document.getElementById("main").dataset.updates || null,
  pwned: window.pwned === 1,
}))()
"""


async def _loaded(page, url: str) -> dict:
    await page.navigate(url)
    await page.wait_for("document.readyState === 'complete'")
    return await page.evaluate(READ_FIRST_VIEW)


@pytest.mark.browser
async def test_first_paint_shows_numbers_and_the_worker_list(node_config, tmp_path):
    project = "laion"
    async with (
        open_node(node_config(jobs=True)) as node,
        httpx.AsyncClient(base_url=node.gateway_url, headers={"X-OCF-Admin-Token": node.admin_token}) as client,
    ):
        assert (await client.put(f"/v1/jobs/{project}", json=PROJECT)).status_code == 201
        assert (await client.post(f"/v1/jobs/{project}/jobs", json=[f"url-{i}" for i in range(12)])).status_code == 201
        alice = await register(client, project, "crawl", "alice")
        await work(client, project, alice["token"], complete=5)
        mallory = await register(client, project, "crawl", "mallory", user=HOSTILE_USER)
        await work(client, project, mallory["token"], complete=2)
        held = (
            await client.post(
                f"/v1/jobs/{project}/claim", json={"max": 1}, headers={"Authorization": f"Bearer {mallory['token']}"}
            )
        ).json()["jobs"]
        await client.post(
            f"/v1/jobs/{project}/heartbeat",
            json={"progress": "<b>50%</b>"},
            headers={"Authorization": f"Bearer {mallory['token']}"},
        )
        stats = (await client.get(f"/v1/jobs/{project}/stats")).json()
        want_completion = f"{stats['completion'] * 100:.1f}%"

        def check(view: dict) -> None:
            assert not view["hidden"] and not view["pwned"], view
            assert view["completion"] == want_completion and view["active"] == "2", view
            assert view["done"] == ["7", "0", "0"], view
            rows = {w["name"]: w for w in view["workers"]}
            assert set(rows) == {alice["name"], mallory["name"]}, view
            m = rows[mallory["name"]]
            assert (m["user"], m["current"], m["progress"], m["done"]) == (
                HOSTILE_USER,
                str(held[0]["id"]),
                "<b>50%</b>",
                "2",
            ), m
            assert m["link"] == f"/v1/jobs/{project}/worker/a/{mallory['name']}"

        async with open_browser(tmp_path / "profile") as page:
            # Without JavaScript: what the server rendered is the whole first view.
            await page.send("Emulation.setScriptExecutionDisabled", {"value": True})
            view = await _loaded(page, f"{node.gateway_url}/dashboard?project={project}")
            check(view)
            assert view["updates"] is None  # nothing came from the script
            await page.send("Emulation.setScriptExecutionDisabled", {"value": False})

            # With JavaScript, right after the load event: already rendered from the embedded data.
            view = await _loaded(page, f"{node.gateway_url}/dashboard?project={project}")
            png = await page.screenshot()
            check(view)
            assert view["updates"] is not None and int(view["updates"]) >= 1
            artifact_path().with_name("dashboard-first-paint.png").write_bytes(png)

            empty = await _loaded(page, f"{node.gateway_url}/dashboard?project=nothing-here")
            assert empty["hidden"]
            empty_png = await page.screenshot()
            assert png.startswith(b"\x89PNG") and len(png) > 3 * len(empty_png), (len(png), len(empty_png))
            # The worker page the list links to exists.
            r = await client.get(view["workers"][0]["link"])
            assert r.status_code == 200 and "text/html" in r.headers["content-type"]
            assert [e for e in page.errors() if not (e.startswith("log (network)") and "status of 404" in e)] == []
