"use strict";
// The benchmarks page: the form's two modes (one load, or a sweep over client counts), and the runs table grouped by
// model and tier, kept up to date by polling GET /api/benchmarks (and each running run's progress) while runs go on.
// Rows are updated in place, so a focused button keeps its focus while the table refreshes.

(() => {
  const F = BenchmarkFigures;
  const el = PF.el;
  const table = document.getElementById("runs-table");
  const empty = document.getElementById("runs-empty");
  const filter = document.getElementById("model-filter");
  const notices = document.getElementById("runs-alert");
  const rows = new Map(); // run id -> {tr, cells, state}
  let runs = PF.initial("initial-runs");
  let progress = {}; // run id -> {done, total}
  let layout = null;
  let poller = null;

  // --- the form's modes -------------------------------------------------------------------------------

  function showMode() {
    const chosen = document.querySelector('input[name="mode"]:checked');
    for (const group of document.querySelectorAll("[data-mode]")) {
      group.hidden = !chosen || group.dataset.mode !== chosen.value;
    }
  }
  for (const radio of document.querySelectorAll('input[name="mode"]')) radio.addEventListener("change", showMode);

  // --- the runs table ---------------------------------------------------------------------------------

  function groupKey(run) {
    return `${run.model}\u0000${run.tier || ""}`;
  }

  function clientsText(run) {
    if (run.mode !== "sweep") return String(run.params.clients);
    const best = run.summary ? run.summary.best_clients : null;
    return `sweep ${run.params.sweep.join(", ")}` + (run.summary ? `: best ${best || "none"}` : "");
  }

  function requestsText(run) {
    if (run.state === "RUNNING") {
      const known = progress[run.id];
      return known && known.total ? `${known.done} of ${known.total}` : "starting";
    }
    return run.mode === "sweep" ? `${run.params.requests} per count` : String(run.params.requests);
  }

  function errorsText(run) {
    if (run.state !== "DONE") return run.error || "";
    const summary = run.summary || {};
    const points = summary.mode === "sweep" ? summary.points || [] : [summary];
    const failed = points.reduce((sum, point) => sum + (point.failed || 0), 0);
    if (!failed) return "none";
    const kinds = {};
    for (const point of points) {
      for (const [kind, count] of Object.entries(point.errors || {})) kinds[kind] = (kinds[kind] || 0) + count;
    }
    return `${failed} (${Object.entries(kinds).sort().map(([kind, count]) => `${kind}: ${count}`).join(", ")})`;
  }

  function makeRow(run) {
    const cells = {};
    const tr = el("tr", {"data-run-id": run.id});
    const columns = ["run", "service", "started", "clients", "requests", "ttft50", "ttft95", "tokens", "errors",
      "actions"];
    for (const name of columns) {
      const numeric = ["ttft50", "ttft95", "tokens"].includes(name);
      cells[name] = el(name === "run" ? "th" : "td", {scope: name === "run" ? "row" : null, "data-field": name,
        class: numeric ? "text-end" : null});
      tr.append(cells[name]);
    }
    cells.actions.className = "actions";
    cells.link = el("a", {href: PF.url(`/ui/benchmarks/${run.id}`), class: "font-monospace"}, run.id);
    cells.badge = el("span", {});
    cells.run.append(cells.link, " ", cells.badge);
    cells.service.append(el("a", {href: PF.serviceUrl(run.service_id)}, run.service_name || run.service_id),
      el("div", {class: "small text-body-secondary font-monospace"}, run.service_id));
    return {tr, cells, state: null};
  }

  function actionButton(run) {
    if (run.state === "RUNNING") {
      return el("button", {type: "button", class: "btn btn-sm btn-outline-danger",
        "aria-label": `Cancel benchmark ${run.id}`, onclick: () => act(run, "cancel")}, "Cancel");
    }
    return el("button", {type: "button", class: "btn btn-sm btn-outline-secondary",
      "aria-label": `Delete benchmark ${run.id}`, onclick: () => act(run, "delete")}, "Delete");
  }

  function updateRow(row, run) {
    const {cells} = row;
    if (row.state !== run.state) {
      cells.badge.replaceChildren(F.badge(run.state));
      cells.actions.replaceChildren(actionButton(run));
      row.state = run.state;
    }
    const shown = F.headline(run);
    const figures = shown ? shown.figures : null;
    PF.setText(cells.started, PF.when(run.created_at));
    PF.setText(cells.clients, clientsText(run));
    PF.setText(cells.requests, requestsText(run));
    PF.setText(cells.ttft50, figures ? F.seconds(figures.ttft_seconds.p50) : "—");
    PF.setText(cells.ttft95, figures ? F.seconds(figures.ttft_seconds.p95) : "—");
    PF.setText(cells.tokens, figures ? F.rate(figures.output_tokens_per_second) : "—");
    PF.setText(cells.errors, errorsText(run));
  }

  function fillFilter() {
    const models = [...new Set(runs.map((run) => run.model))].sort();
    const wanted = filter.value || filter.dataset.initial || "";
    if (wanted && !models.includes(wanted)) models.unshift(wanted);
    const current = [...filter.options].slice(1).map((option) => option.value);
    if (current.join("\u0000") !== models.join("\u0000")) {
      filter.replaceChildren(el("option", {value: ""}, "All models"),
        ...models.map((model) => el("option", {value: model}, model)));
    }
    filter.value = wanted;
    delete filter.dataset.initial;
  }

  function render() {
    fillFilter();
    const shown = runs.filter((run) => !filter.value || run.model === filter.value);
    const groups = new Map();
    for (const run of shown) {
      if (!groups.has(groupKey(run))) groups.set(groupKey(run), []);
      groups.get(groupKey(run)).push(run);
    }
    for (const run of shown) {
      if (!rows.has(run.id)) rows.set(run.id, makeRow(run));
      updateRow(rows.get(run.id), run);
    }
    const known = new Set(runs.map((run) => run.id));
    for (const id of [...rows.keys()]) if (!known.has(id)) rows.delete(id);
    // Rebuilt only when the runs or their grouping change: rows are moved, not recreated.
    const wanted = [...groups.entries()]
      .map(([key, items]) => `${key}\u0001${items.map((run) => run.id).join(",")}`).join("\u0002");
    if (wanted !== layout) {
      for (const body of table.querySelectorAll("tbody")) body.remove();
      for (const items of groups.values()) {
        const first = items[0];
        const heading = el("tr", {class: "table-light"}, el("th", {scope: "rowgroup", colspan: 10},
          first.model, el("span", {class: "fw-normal text-body-secondary"},
            ` · tier ${first.tier || "explicit resources"} · ${items.length} run${items.length === 1 ? "" : "s"}`)));
        table.append(el("tbody", {"data-model": first.model, "data-tier": first.tier || ""}, heading,
          ...items.map((run) => rows.get(run.id).tr)));
      }
      layout = wanted;
    }
    empty.hidden = shown.length > 0;
    PF.setText(empty, runs.length ? "No runs of this model." : "No benchmark runs yet.");
  }

  async function refresh() {
    const answer = await PF.api("GET", "/api/benchmarks");
    const running = answer.benchmarks.filter((run) => run.state === "RUNNING");
    const next = {};
    await Promise.all(running.map(async (run) => {
      try {
        next[run.id] = (await PF.api("GET", `/api/benchmarks/${run.id}`)).progress;
      } catch (err) {
        next[run.id] = progress[run.id];
      }
    }));
    runs = answer.benchmarks;
    progress = next;
    render();
  }

  async function act(run, action) {
    const cancel = action === "cancel";
    const ok = await PF.confirm(`${cancel ? "Cancel" : "Delete"} benchmark ${run.id}?`,
      cancel ? "This stops the load now; what it measured so far is not kept."
        : "This forgets the run and its figures.", `${cancel ? "Cancel" : "Delete"} benchmark`);
    if (!ok) return;
    try {
      await PF.api("DELETE", `/api/benchmarks/${run.id}`);
    } catch (err) {
      PF.alert(notices, "danger", `Could not ${action}: ${err.message}`);
    }
    poller.now();
  }

  filter.addEventListener("change", render);
  showMode();
  render();
  poller = PF.poll(refresh, () => (runs.some((run) => run.state === "RUNNING") ? 2000 : 15000),
    document.getElementById("refresh-status"), runs.some((run) => run.state === "RUNNING"));
})();
