"""The dashboard's first view, rendered on the server so the page has data at first paint.

The original tracker's pages were server HTML; ours used to arrive empty and
fill in by script, so a screenshot, a slow client or a reader without
JavaScript saw a grey page. Now the server fills the summary, the stages and
the live worker list into the HTML, and embeds the same data (stats,
leaderboard, workers) as a JSON data block that the script renders at once
before it goes live on the event stream.

Every string that comes from users (project, stage, worker and user names,
progress messages) is escaped with :func:`html.escape`; the JSON block
escapes ``<``, ``>`` and ``&`` so no value can close the block. A data block
is not executed, so the page's Content-Security-Policy (no inline scripts)
still holds.
"""

from __future__ import annotations

import json
import math
from html import escape
from typing import Any

from .tracker import Tracker
from .views import list_workers

FIRST_WORKERS = 50
FIRST_BOARD = 50


def _number(value: int) -> str:
    return f"{value:,}"


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "unknown"
    if seconds == 0:
        return "done"
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    if s < 86400:
        return f"{s // 3600} h {(s % 3600) // 60:02d} min"
    return f"{s // 86400} d {(s % 86400) // 3600} h"


def _stage_rows(stats: dict[str, Any]) -> str:
    rows = []
    for stage in stats["stages"]:
        counts = "".join(
            f'<span class="count {name}"><span class="count-label">{name}</span> <b '
            f'data-field="{name}">{_number(stage[name])}</b></span>'
            for name in ("done", "failed", "leased", "pending", "total", "expected")
        )
        # Segment widths are set by the script (CSSOM): the CSP forbids inline style attributes.
        bar = "".join(
            f'<span class="seg {name}" data-segment="{name}"></span>'
            for name in ("done", "failed", "leased", "pending")
        )
        rows.append(
            f'<div class="stage" data-stage="{escape(stage["name"])}"><div class="stage-head">'
            f'<span class="stage-letter">{stage["letter"]}</span><span '
            f'class="stage-name">{escape(stage["name"])}</span>'
            f'<span class="pct" data-field="progress">{stage["progress"] * 100:.1f}%</span>'
            f'<span class="stage-workers"><span data-field="workers_active">{_number(stage["workers_active"])}</span> '
            "active workers</span></div>"
            f'<div class="bar">{bar}</div><div class="counts">{counts}</div></div>'
        )
    return "".join(rows)


def worker_rows(project: str, workers: list[dict[str, Any]]) -> str:
    if not workers:
        return '<tr><td class="quiet" colspan="7">no active workers</td></tr>'
    out = []
    for w in workers:
        link = f"/v1/jobs/{escape(project)}/worker/{w['stage_letter']}/{escape(w['name'])}"
        jobs = ", ".join(str(j) for j in w["current_jobs"]) or "–"
        out.append(
            f'<tr data-name="{escape(w["name"])}"><td class="name"><a href="{link}">{escape(w["name"])}</a></td>'
            f'<td>{escape(w["user"])}</td><td>{escape(w["stage"])}</td><td data-field="current">{jobs}</td>'
            f'<td class="progress">{escape(w["progress"])}</td><td class="n" '
            f'data-field="done">{_number(w["jobs_completed"])}</td>'
            f'<td data-field="seen" data-time="{w["last_seen"]}"></td></tr>'
        )
    return "".join(out)


def _data_block(data: dict[str, Any]) -> str:
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    text = text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
    return f'<script type="application/json" id="initial-data">{text}</script>'


def render(template: str, tracker: Tracker | None, wanted: str | None) -> str:
    """The page with its first view filled in, or with empty slots when there is nothing to show."""
    project = None
    if tracker is not None:
        names = [p.name for p in tracker.store.projects()]
        if wanted is None and names:
            project = names[0]
        elif wanted in names:
            project = wanted
    slots = {
        "MAIN_HIDDEN": " hidden",
        "PROJECT": "",
        "COMPLETION": "–",
        "ETA": "–",
        "ACTIVE": "–",
        "TOTAL": "–",
        "RESULTS": "–",
        "STAGES": "",
        "WORKERS": "",
        "INITIAL": "",
    }
    if tracker is not None and project is not None:
        now = tracker.clock()
        stats = tracker.store.stats(project, now)
        board = tracker.store.leaderboard(project, now, limit=FIRST_BOARD)
        workers = list_workers(tracker.store, project, now, limit=FIRST_WORKERS)
        slots.update(
            MAIN_HIDDEN="",
            PROJECT=escape(project),
            COMPLETION=f"{stats['completion'] * 100:.1f}%",
            ETA=_duration(stats["eta_seconds"]),
            ACTIVE=_number(stats["workers"]["active"]),
            TOTAL=_number(stats["workers"]["total"]),
            RESULTS=_number(stats["results"]),
            STAGES=_stage_rows(stats),
            WORKERS=worker_rows(project, workers["workers"]),
            INITIAL=_data_block({"project": project, "stats": stats, "board": board, "workers": workers}),
        )
    for key, value in slots.items():
        template = template.replace(f"@@{key}@@", value)
    return template
