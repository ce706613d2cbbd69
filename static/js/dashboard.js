"use strict";
// The dashboard: the services table and the scheduler banner, kept up to date by polling GET /api/services.
// Rows are updated in place, so a focused button keeps its focus while the table refreshes.

(() => {
  const body = document.getElementById("services-body");
  const empty = document.getElementById("services-empty");
  const showEnded = document.getElementById("show-ended");
  const prune = document.getElementById("prune");
  const notices = document.getElementById("dashboard-alert");
  const rows = new Map(); // service id -> {tr, cells, actionsKey}
  let data = PF.initial("initial-data");
  let poller = null;

  function actionsKey(service) {
    return [service.state === "RUNNING", PF.isLive(service)].join();
  }

  function actionButtons(service) {
    const cell = [];
    cell.push(PF.el("a", {class: "btn btn-sm btn-outline-primary", href: PF.serviceUrl(service.id),
      "aria-label": `Details of ${service.name}`}, "Details"));
    if (service.state === "RUNNING") {
      cell.push(" ", PF.el("a", {class: "btn btn-sm btn-outline-success", href: PF.serviceUrl(service.id, "playground"),
        "aria-label": `Playground of ${service.name}`}, "Playground"));
    }
    if (PF.isLive(service)) {
      cell.push(" ", PF.el("button", {type: "button", class: "btn btn-sm btn-outline-danger", "data-action": "stop",
        "aria-label": `Stop ${service.name}`, onclick: () => act(service.id, "stop")}, "Stop"));
    } else {
      cell.push(" ", PF.el("button", {type: "button", class: "btn btn-sm btn-outline-secondary", "data-action": "delete",
        "aria-label": `Delete ${service.name}`, onclick: () => act(service.id, "delete")}, "Delete"));
    }
    return cell;
  }

  function makeRow(service) {
    const cells = {};
    const tr = PF.el("tr", {"data-service-id": service.id});
    for (const name of ["name", "state", "model", "tier", "node", "age", "left", "actions"]) {
      cells[name] = PF.el(name === "name" ? "th" : "td", name === "name" ? {scope: "row"} : {});
      tr.append(cells[name]);
    }
    cells.actions.className = "actions";
    cells.link = PF.el("a", {href: PF.serviceUrl(service.id)});
    cells.id = PF.el("div", {class: "small text-body-secondary font-monospace"});
    cells.name.append(cells.link, cells.id);
    cells.reason = PF.el("div", {class: "small text-body-secondary text-truncate", style: "max-width: 22rem"});
    cells.timeLeft = PF.el("span");
    cells.stops = PF.el("div", {class: "small text-body-secondary", "data-field": "stops"});  // "stops in 12 min if unused"
    cells.renewal = PF.el("div", {class: "small text-body-secondary", "data-field": "renewal"});  // "renews until stopped"
    cells.left.append(cells.timeLeft, cells.stops, cells.renewal);
    cells.nodeName = PF.el("span");
    cells.replicas = PF.el("div", {class: "small text-body-secondary", "data-field": "replicas"});  // "replicas 1:3"
    cells.node.append(cells.nodeName, cells.replicas);
    return {tr, cells, actionsKey: null, state: null};
  }

  function updateRow(row, service) {
    const {cells} = row;
    PF.setText(cells.link, service.name);
    PF.setText(cells.id, service.id);
    if (row.state !== service.state) {
      cells.state.replaceChildren(PF.badge(service.state), cells.reason);
      row.state = service.state;
    }
    PF.setText(cells.reason, service.reason || "");
    cells.reason.title = service.reason || "";
    PF.setText(cells.model, service.model + (service.kind ? ` (${service.kind})` : ""));
    PF.setText(cells.tier, service.tier || "explicit resources");
    PF.setText(cells.nodeName, service.node || "—");
    PF.setText(cells.replicas, PF.isLive(service) && service.replicas ? `replicas ${PF.replicas(service)}` : "");
    PF.setText(cells.age, PF.since(service.created_at));
    PF.setText(cells.timeLeft, PF.timeLeft(service));
    PF.setText(cells.stops, PF.stopsIn(service));
    PF.setText(cells.renewal, PF.isLive(service) ? PF.renewal(service) : "");
    const key = actionsKey(service);
    if (row.actionsKey !== key) {
      cells.actions.replaceChildren(...actionButtons(service));
      row.actionsKey = key;
    }
  }

  function renderBanner() {
    const scheduler = (data.conditions || {}).scheduler;
    const banner = document.getElementById("scheduler-banner");
    const down = Boolean(scheduler && !scheduler.ok);
    banner.hidden = !down;
    PF.setText(document.getElementById("scheduler-message"),
      down ? `${scheduler.message || ""} (since ${PF.when(scheduler.since)}).` : "");
  }

  function render() {
    renderBanner();
    const shown = data.services.filter((service) => showEnded.checked || PF.isLive(service));
    const wanted = new Set(shown.map((service) => service.id));
    for (const [id, row] of rows) {
      if (!wanted.has(id)) {
        row.tr.remove();
        rows.delete(id);
      }
    }
    shown.forEach((service, index) => {
      let row = rows.get(service.id);
      if (!row) {
        row = makeRow(service);
        rows.set(service.id, row);
      }
      updateRow(row, service);
      if (body.children[index] !== row.tr) body.insertBefore(row.tr, body.children[index] || null);
    });
    empty.hidden = data.services.length > 0;
    prune.hidden = !data.services.some((service) => !PF.isLive(service));
  }

  async function refresh() {
    data = await PF.api("GET", "/api/services");
    render();
  }

  async function act(id, action) {
    const service = data.services.find((item) => item.id === id);
    if (!service) return;
    try {
      if (action === "stop") {
        if (await PF.stopService(service)) {
          PF.alert(notices, "info", `Stopping ${service.name}: Slurm is cancelling its job.`);
        }
      } else if (await PF.deleteService(service)) {
        PF.alert(notices, "success", `Deleted ${service.name}.`);
      }
    } catch (err) {
      PF.alert(notices, "danger", `Could not ${action} ${service.name}: ${err.message}`);
    }
    poller.now();
  }

  prune.addEventListener("click", async () => {
    const ended = data.services.filter((service) => !PF.isLive(service)).length;
    if (!await PF.confirm("Delete every ended service?",
      `This forgets ${ended} ended service(s) and removes their job folders.`, "Delete ended services")) return;
    try {
      const result = await PF.api("DELETE", "/api/services?state=ENDED");
      PF.alert(notices, "success", `Deleted ${result.deleted.length} ended service(s).`);
    } catch (err) {
      PF.alert(notices, "danger", `Could not delete the ended services: ${err.message}`);
    }
    poller.now();
  });
  showEnded.addEventListener("change", render);

  render();
  // Fast while a service is on its way up, slower when nothing changes.
  poller = PF.poll(refresh, () => (data.services.some((s) => PF.isLive(s) && s.state !== "RUNNING") ? 1500 : 4000),
    document.getElementById("refresh-status"), false);
})();
