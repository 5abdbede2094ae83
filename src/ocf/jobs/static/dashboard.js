// ocf jobs dashboard: renders /v1/jobs/<p>/stats and /leaderboard, live on /v1/jobs/<p>/events.
//
// Every string that comes from the API (project, stage, worker and user names,
// error messages) is written with textContent or as an attribute value, never
// parsed as HTML, so a nickname like "<img onerror=...>" shows as text.
"use strict";

(() => {
  const API = "/v1/jobs";
  const BOARD_MIN_INTERVAL_MS = 1500; // leaderboard re-fetch throttle while stats stream in
  const RECONNECT_MS = 5000;          // after the event stream is closed for good (e.g. node restart)
  const NO_PROJECT_RETRY_MS = 5000;   // "no projects yet": look again, the page comes alive by itself
  const PAGE_SIZE = 50;               // leaderboard and worker list rows per page
  const STAGE_COLORS = ["#2f7ed8", "#8e44ad", "#16a085", "#d35400", "#c0392b"];
  const SVG_NS = "http://www.w3.org/2000/svg";
  const num = new Intl.NumberFormat("en-US");

  const state = {
    project: null,
    stats: null,
    board: null,
    period: "all_time",
    source: null,
    boardTimer: null,
    lastBoardFetch: 0,
    updates: 0,
    boardOffset: 0,
    workers: null,
    workersOffset: 0,
    workersAll: false,
  };
  const $ = (id) => document.getElementById(id);

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  async function getJSON(path) {
    let response;
    try {
      response = await fetch(path, { headers: { Accept: "application/json" }, cache: "no-store" });
    } catch (err) {
      throw new ApiError(0, "network", `cannot reach the node (${err.message})`);
    }
    let body = null;
    try {
      body = await response.json();
    } catch (_) {
      body = null;
    }
    if (!response.ok) {
      const error = (body && body.error) || {};
      throw new ApiError(response.status, error.code || "http_" + response.status, error.message || response.statusText);
    }
    return body;
  }

  // --- small DOM helpers (text only) ------------------------------------------------------

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (key === "text") node.textContent = value;
      else if (key === "className") node.className = value;
      else node.setAttribute(key, value);
    }
    for (const child of children) node.append(child);
    return node;
  }

  function svg(tag, attrs = {}) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (key === "text") node.textContent = value;
      else node.setAttribute(key, String(value));
    }
    return node;
  }

  function setText(node, text) {
    if (node.textContent !== text) node.textContent = text;
  }

  function setNumber(node, value) {
    node.dataset.value = String(value);
    setText(node, num.format(value));
  }

  function percent(fraction) {
    return (fraction * 100).toFixed(1) + "%";
  }

  function duration(seconds) {
    const s = Math.round(seconds);
    if (s < 60) return `${s} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${String(s % 60).padStart(2, "0")} s`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")} min`;
    return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
  }

  function rate(perSecond) {
    if (perSecond <= 0) return "idle";
    if (perSecond >= 1) return `${perSecond.toFixed(1)}/s`;
    return `${(perSecond * 60).toFixed(1)}/min`;
  }

  function clock(epochSeconds, withSeconds = true) {
    const options = { hour: "2-digit", minute: "2-digit", hour12: false };
    if (withSeconds) options.second = "2-digit";
    return new Date(epochSeconds * 1000).toLocaleTimeString("en-GB", options);
  }

  function setLive(mode, text) {
    const live = $("live");
    live.dataset.state = mode;
    setText(live, text);
  }

  function showMessage(text) {
    const message = $("message");
    message.textContent = text;
    message.hidden = false;
    $("main").hidden = true;
  }

  function hideMessage() {
    $("message").hidden = true;
    $("main").hidden = false;
  }

  // --- summary + stages -------------------------------------------------------------------

  function renderStats(stats) {
    if (state.stats && stats.time < state.stats.time) return; // a late answer to an older request
    state.stats = stats;
    state.updates += 1;
    setText($("completion"), percent(stats.completion));
    $("completion").dataset.value = String(stats.completion);
    const eta = $("eta");
    eta.dataset.value = stats.eta_seconds === null ? "" : String(stats.eta_seconds);
    if (stats.eta_seconds === null) {
      setText(eta, "unknown");
      eta.title = "nothing completed in the last 15 minutes";
    } else {
      setText(eta, stats.eta_seconds === 0 ? "done" : duration(stats.eta_seconds));
      eta.title = "";
    }
    setNumber($("workers-active"), stats.workers.active);
    setNumber($("workers-total"), stats.workers.total);
    setNumber($("results"), stats.results);
    renderStages(stats.stages);
    renderThroughput();
    renderFailures(stats.recent_failures);
    setText($("updated"), `updated ${clock(stats.time)}`);
    $("main").dataset.updates = String(state.updates);
    $("main").dataset.time = String(stats.time);
  }

  const SEGMENTS = ["done", "failed", "leased", "pending"];
  const COUNTS = ["done", "failed", "leased", "pending", "total", "expected"];

  function stageRow(stage, index) {
    const row = el("div", { className: "stage", "data-stage": stage.name });
    const swatch = el("span", { className: "swatch" });
    swatch.style.background = STAGE_COLORS[index % STAGE_COLORS.length];
    row.append(
      el("div", { className: "stage-head" },
        swatch,
        el("span", { className: "stage-letter", text: stage.letter }),
        el("span", { className: "stage-name", text: stage.name }),
        el("span", { className: "pct", "data-field": "progress" }),
        el("span", { className: "rate", "data-field": "rate" }),
        el("span", { className: "stage-workers" }, el("span", { "data-field": "workers_active" }), el("span", { className: "workers-label" })),
      ),
    );
    const bar = el("div", { className: "bar", role: "img" });
    for (const name of SEGMENTS) bar.append(el("span", { className: `seg ${name}`, "data-segment": name }));
    row.append(bar);
    const counts = el("div", { className: "counts" });
    for (const name of COUNTS) {
      counts.append(el("span", { className: `count ${name}` }, el("span", { className: "count-label", text: name }), " ", el("b", { "data-field": name })));
    }
    row.append(counts);
    return row;
  }

  function renderStages(stages) {
    const box = $("stages");
    const names = stages.map((s) => s.name).join("\u0000");
    if (box.dataset.names !== names) {
      box.replaceChildren(...stages.map(stageRow));
      box.dataset.names = names;
    }
    stages.forEach((stage, index) => {
      const row = box.children[index];
      const field = (name) => row.querySelector(`[data-field="${name}"]`);
      for (const name of COUNTS) setNumber(field(name), stage[name]);
      setText(field("progress"), percent(stage.progress));
      field("progress").dataset.value = String(stage.progress);
      setText(field("rate"), rate(stage.rate_per_s));
      field("rate").dataset.value = String(stage.rate_per_s);
      setNumber(field("workers_active"), stage.workers_active);
      setText(row.querySelector(".workers-label"), stage.workers_active === 1 ? " active worker" : " active workers");
      const whole = Math.max(stage.expected, stage.total, 1);
      const bar = row.querySelector(".bar");
      for (const name of SEGMENTS) {
        const seg = bar.querySelector(`[data-segment="${name}"]`);
        seg.style.width = `${(100 * stage[name]) / whole}%`;
        seg.title = `${name}: ${num.format(stage[name])}`;
      }
      bar.setAttribute("aria-label", `${stage.name}: ${percent(stage.progress)} (${stage.done} done, ${stage.failed} failed, ${stage.leased} leased, ${stage.pending} pending of ${stage.expected})`);
    });
  }

  // --- throughput chart (inline SVG, stacked bars per minute) -----------------------------

  function renderThroughput() {
    const stats = state.stats;
    if (!stats) return;
    const box = $("throughput");
    const series = stats.throughput;
    const names = stats.stages.map((s) => s.name);
    const totals = series.map((m) => m.completed.reduce((a, b) => a + b, 0));
    const sum = totals.reduce((a, b) => a + b, 0);
    setNumber($("throughput-total"), sum);

    const width = Math.max(box.clientWidth, 300);
    const height = 180;
    const pad = { left: 44, right: 8, top: 10, bottom: 22 };
    const plotW = width - pad.left - pad.right;
    const plotH = height - pad.top - pad.bottom;
    const top = niceCeiling(Math.max(...totals, 1));
    const slot = plotW / Math.max(series.length, 1);
    const y = (v) => pad.top + plotH - (plotH * v) / top;

    const chart = svg("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": `${sum} jobs completed in the last 60 minutes` });
    for (const tick of [0, top / 2, top]) {
      chart.append(svg("line", { x1: pad.left, x2: width - pad.right, y1: y(tick), y2: y(tick), class: "grid" }));
      chart.append(svg("text", { x: pad.left - 6, y: y(tick) + 4, class: "axis", "text-anchor": "end", text: num.format(tick) }));
    }
    series.forEach((minute, i) => {
      const x = pad.left + i * slot;
      const group = svg("g", { "data-minute": minute.minute });
      let base = 0;
      minute.completed.forEach((count, stage) => {
        if (!count) return;
        group.append(svg("rect", {
          x: x + 1, width: Math.max(slot - 2, 1), y: y(base + count), height: y(base) - y(base + count),
          fill: STAGE_COLORS[stage % STAGE_COLORS.length],
        }));
        base += count;
      });
      const detail = minute.completed.map((c, s) => `${names[s]} ${c}`).join(", ");
      group.append(svg("title", { text: `${clock(minute.minute, false)}: ${detail}` }));
      // An invisible full-height target so hovering an empty minute shows its tooltip too.
      group.prepend(svg("rect", { x, width: slot, y: pad.top, height: plotH, class: "hover" }));
      chart.append(group);
      if (i % 10 === 0 || i === series.length - 1) {
        chart.append(svg("text", { x: x + slot / 2, y: height - 6, class: "axis", "text-anchor": "middle", text: clock(minute.minute, false) }));
      }
    });
    box.replaceChildren(chart);

    const legend = $("throughput-legend");
    if (legend.dataset.names !== names.join("\u0000")) {
      legend.replaceChildren(...names.map((name, i) => {
        const key = el("span", { className: "key" });
        key.style.background = STAGE_COLORS[i % STAGE_COLORS.length];
        return el("span", { className: "legend-item" }, key, name);
      }));
      legend.dataset.names = names.join("\u0000");
    }
  }

  function niceCeiling(value) {
    const magnitude = 10 ** Math.floor(Math.log10(value));
    for (const step of [1, 2, 5, 10]) if (value <= step * magnitude) return step * magnitude;
    return 10 * magnitude;
  }

  // --- failures ---------------------------------------------------------------------------

  function renderFailures(failures) {
    const body = $("failures").tBodies[0];
    body.replaceChildren(...failures.map((f) => {
      const error = el("td", { className: "error", text: String(f.error ?? "") });
      error.title = String(f.error ?? "");
      return el("tr", { "data-job": String(f.job) },
        el("td", { text: clock(f.time) }),
        el("td", { text: String(f.stage) }),
        el("td", { text: String(f.job) }),
        el("td", { text: String(f.attempt) }),
        error,
      );
    }));
    $("failures").hidden = failures.length === 0;
    $("no-failures").hidden = failures.length !== 0;
  }

  // --- leaderboard ------------------------------------------------------------------------

  function renderBoard() {
    const board = state.board;
    if (!board) return;
    for (const kind of ["users", "workers"]) {
      renderBoardTable($(`board-${kind}`), board[kind], board.stages, board.offset || 0);
      if (board.total) setText($(`board-${kind}-count`), `(${num.format(board.total[kind])})`);
    }
    const total = board.total ? Math.max(board.total.users, board.total.workers) : 0;
    renderPager("board", state.boardOffset, total);
  }

  function renderBoardTable(table, rows, stages, offset) {
    const period = state.period;
    const totalKey = period === "all_time" ? "total" : "total_24h";
    const otherKey = period === "all_time" ? "total_24h" : "total";
    const head = el("tr", {}, el("th", { text: "#" }), el("th", { text: "name" }));
    for (const stage of stages) head.append(el("th", { className: "n", text: stage }));
    head.append(el("th", { className: "n", text: "total" }), el("th", { className: "n", text: period === "all_time" ? "24 h" : "all time" }));
    table.tHead.replaceChildren(head);

    const shown = rows.filter((r) => r[totalKey] > 0).sort((a, b) => b[totalKey] - a[totalKey] || (a.name < b.name ? -1 : 1));
    if (!shown.length) {
      table.tBodies[0].replaceChildren(el("tr", {}, el("td", { className: "quiet", colspan: String(stages.length + 4), text: "nobody yet" })));
      return;
    }
    table.tBodies[0].replaceChildren(...shown.map((row, i) => {
      const tr = el("tr", { "data-name": row.name }, el("td", { text: String(offset + i + 1) }), el("td", { className: "name", text: row.name }));
      for (const stage of stages) {
        tr.append(el("td", { className: "n", "data-stage": stage, "data-field": "count", text: num.format(row[period][stage] || 0) }));
      }
      tr.append(
        el("td", { className: "n total", "data-field": totalKey, text: num.format(row[totalKey]) }),
        el("td", { className: "n", "data-field": otherKey, text: num.format(row[otherKey]) }),
      );
      return tr;
    }));
  }

  // --- pagers -----------------------------------------------------------------------------

  function renderPager(prefix, offset, total) {
    const last = Math.max(0, Math.ceil(total / PAGE_SIZE) - 1);
    const page = Math.floor(offset / PAGE_SIZE);
    $(`${prefix}-prev`).disabled = page <= 0;
    $(`${prefix}-next`).disabled = page >= last;
    setText($(`${prefix}-page`), total > PAGE_SIZE ? `page ${page + 1} of ${last + 1}` : "");
  }

  // --- live workers -----------------------------------------------------------------------

  function ago(seconds) {
    if (seconds < 2) return "now";
    return `${duration(seconds)} ago`;
  }

  function renderWorkers() {
    const list = state.workers;
    if (!list) return;
    const body = $("workers").tBodies[0];
    const now = state.stats ? state.stats.time : Date.now() / 1000;
    if (!list.workers.length) {
      body.replaceChildren(el("tr", {}, el("td", { className: "quiet", colspan: "7", text: state.workersAll ? "no workers" : "no active workers" })));
    } else {
      body.replaceChildren(...list.workers.map((w) => {
        const link = el("a", { href: `${projectPath()}/worker/${w.stage_letter}/${encodeURIComponent(w.name)}`, text: w.name });
        return el("tr", { "data-name": w.name },
          el("td", { className: "name" }, link),
          el("td", { text: w.user }),
          el("td", { text: w.stage }),
          el("td", { "data-field": "current", text: w.current_jobs.length ? w.current_jobs.join(", ") : "–" }),
          el("td", { className: "progress", text: w.progress }),
          el("td", { className: "n", "data-field": "done", text: num.format(w.jobs_completed) }),
          el("td", { "data-field": "seen", text: ago(Math.max(0, now - w.last_seen)) }),
        );
      }));
    }
    setText($("workers-shown"), state.workersAll ? `all ${num.format(list.total)} registered` : `${num.format(list.total)} active in the last 5 min`);
    renderPager("workers", state.workersOffset, list.total);
  }

  async function refreshWorkers() {
    const query = new URLSearchParams({ limit: String(PAGE_SIZE), offset: String(state.workersOffset) });
    if (state.workersAll) query.set("all", "1");
    state.workers = await getJSON(`${projectPath()}/workers?${query}`);
    renderWorkers();
  }

  // --- data flow --------------------------------------------------------------------------

  const projectPath = () => `${API}/${encodeURIComponent(state.project)}`;

  async function refreshStats() {
    renderStats(await getJSON(`${projectPath()}/stats`));
  }

  async function refreshBoard() {
    state.lastBoardFetch = Date.now();
    const query = new URLSearchParams({ limit: String(PAGE_SIZE), offset: String(state.boardOffset) });
    state.board = await getJSON(`${projectPath()}/leaderboard?${query}`);
    renderBoard();
  }

  // At most one leaderboard fetch per BOARD_MIN_INTERVAL_MS, and always one after the last change.
  function scheduleBoard() {
    if (state.boardTimer !== null) return;
    const wait = Math.max(0, state.lastBoardFetch + BOARD_MIN_INTERVAL_MS - Date.now());
    state.boardTimer = setTimeout(() => {
      state.boardTimer = null;
      refreshBoard().catch((err) => setLive("error", `leaderboard: ${err.message}`));
      refreshWorkers().catch((err) => setLive("error", `workers: ${err.message}`));
    }, wait);
  }

  function connect() {
    if (state.source) state.source.close();
    const source = new EventSource(`${projectPath()}/events`);
    state.source = source;
    source.addEventListener("open", () => setLive("live", "live"));
    source.addEventListener("stats", (event) => {
      renderStats(JSON.parse(event.data));
      scheduleBoard();
    });
    source.addEventListener("error", () => {
      if (source.readyState === EventSource.CLOSED) {
        setLive("offline", "offline, retrying");
        setTimeout(() => { if (state.source === source) connect(); }, RECONNECT_MS);
      } else {
        setLive("connecting", "reconnecting");
      }
    });
  }

  function renderProjects(projects, current) {
    const nav = $("projects");
    if (projects.length < 2) {
      nav.replaceChildren();
      return;
    }
    nav.replaceChildren(...projects.map((p) => {
      const link = el("a", { href: `?${new URLSearchParams({ project: p.name })}`, text: p.name });
      link.title = `${percent(p.completion)} complete`;
      if (p.name === current) link.setAttribute("aria-current", "page");
      return link;
    }));
  }

  // The server embeds the first view's data (and fills it into the HTML): render it at once,
  // before the load event, so the page has data at first paint; then go live.
  function startFromServer() {
    const block = $("initial-data");
    if (!block) return false;
    let data;
    try {
      data = JSON.parse(block.textContent);
    } catch (_) {
      return false;
    }
    state.project = data.project;
    document.title = `${state.project} · ocf jobs`;
    setText($("project-name"), state.project);
    hideMessage();
    renderStats(data.stats);
    state.board = data.board;
    state.lastBoardFetch = Date.now();
    renderBoard();
    state.workers = data.workers;
    renderWorkers();
    getJSON(API).then((answer) => renderProjects(answer.projects, state.project)).catch(() => {});
    connect();
    return true;
  }

  async function start() {
    const wanted = new URLSearchParams(location.search).get("project");
    let projects;
    try {
      projects = (await getJSON(API)).projects;
    } catch (err) {
      setLive("offline", "offline");
      if (err.code === "no_tracker") {
        showMessage("This node does not host a job tracker. Start it with --jobs to get a dashboard here.");
      } else {
        showMessage(`Cannot load the projects: ${err.message}`);
      }
      return;
    }
    renderProjects(projects, wanted);
    if (!projects.length) {
      setLive("waiting", "waiting");
      showMessage("No projects yet. Create one with PUT /v1/jobs/<name>; this page will pick it up.");
      setTimeout(start, NO_PROJECT_RETRY_MS);
      return;
    }
    if (wanted !== null && !projects.some((p) => p.name === wanted)) {
      setLive("offline", "offline");
      const names = projects.map((p) => p.name).join(", ");
      showMessage(`No project named "${wanted}" on this tracker. Projects: ${names}.`);
      renderProjects(projects, null);
      return;
    }
    state.project = wanted ?? projects[0].name;
    renderProjects(projects, state.project);
    document.title = `${state.project} · ocf jobs`;
    setText($("project-name"), state.project);
    hideMessage();
    try {
      await Promise.all([refreshStats(), refreshBoard(), refreshWorkers()]);
    } catch (err) {
      showMessage(`Cannot load project "${state.project}": ${err.message}`);
      return;
    }
    connect();
  }

  document.addEventListener("DOMContentLoaded", () => {
    for (const radio of document.querySelectorAll('input[name="period"]')) {
      radio.addEventListener("change", () => {
        state.period = radio.value;
        renderBoard();
      });
    }
    let resizeTimer = null;
    window.addEventListener("resize", () => {
      clearTimeout(resizeTimer);
      resizeTimer = setTimeout(renderThroughput, 100);
    });
    const page = (prefix, delta) => () => {
      const key = prefix === "board" ? "boardOffset" : "workersOffset";
      state[key] = Math.max(0, state[key] + delta * PAGE_SIZE);
      (prefix === "board" ? refreshBoard() : refreshWorkers()).catch((err) => setLive("error", `${prefix}: ${err.message}`));
    };
    for (const prefix of ["board", "workers"]) {
      $(`${prefix}-prev`).addEventListener("click", page(prefix, -1));
      $(`${prefix}-next`).addEventListener("click", page(prefix, 1));
    }
    $("workers-all").addEventListener("change", (event) => {
      state.workersAll = event.target.checked;
      state.workersOffset = 0;
      refreshWorkers().catch((err) => setLive("error", `workers: ${err.message}`));
    });
    if (!startFromServer()) start();
  });
})();
