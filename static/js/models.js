"use strict";
// The models page: downloads with live progress (GET /api/models/downloads) and cancel, deleting a model of
// your own (DELETE /api/models/<repo>), and scanning the model folders again (GET /api/models?refresh=1).

(() => {
  const notices = document.getElementById("models-alert");
  const list = document.getElementById("downloads");
  const empty = document.getElementById("downloads-empty");
  const form = document.getElementById("download-form");
  const repo = document.getElementById("download-repo");
  const revision = document.getElementById("download-revision");
  const repoError = document.getElementById("download-error");
  const LIVE = ["queued", "running"];
  const STATE_CLASSES = {queued: "text-bg-secondary", running: "text-bg-primary", done: "text-bg-success",
    failed: "text-bg-danger", cancelled: "text-bg-secondary"};
  const items = new Map(); // download id -> {li, parts, state}
  let downloads = PF.initial("initial-downloads");
  const started = new Set(); // downloads started from this page: their end is announced
  let finishedSinceLoad = false;

  function makeItem(task) {
    const parts = {
      title: PF.el("strong", {class: "text-break"}),
      badge: PF.el("span", {class: "badge ms-2"}),
      bar: PF.el("div", {class: "progress-bar", style: "width: 0%"}),
      text: PF.el("div", {class: "small text-body-secondary"}),
      error: PF.el("div", {class: "small text-danger"}),
      actions: PF.el("div", {class: "ms-auto"}),
    };
    parts.progress = PF.el("div", {class: "progress mt-1", role: "progressbar", "aria-valuemin": "0", "aria-valuemax": "100",
      "aria-label": `Download of ${task.repo_id}`}, parts.bar);
    const li = PF.el("li", {class: "list-group-item", "data-download-id": task.id},
      PF.el("div", {class: "d-flex align-items-center gap-2"}, PF.el("div", {}, parts.title, parts.badge), parts.actions),
      parts.progress, parts.text, parts.error);
    return {li, parts, state: null};
  }

  function updateItem(item, task) {
    const {parts} = item;
    PF.setText(parts.title, `${task.repo_id}${task.revision && task.revision !== "main" ? " @ " + task.revision : ""}`);
    PF.setText(parts.badge, task.state);
    parts.badge.className = `badge ms-2 ${STATE_CLASSES[task.state] || "text-bg-secondary"}`;
    const percent = task.bytes_total ? Math.min(100, Math.round(100 * task.bytes_done / task.bytes_total)) :
      (task.state === "done" ? 100 : 0);
    parts.bar.style.width = `${percent}%`;
    parts.progress.setAttribute("aria-valuenow", String(percent));
    parts.progress.hidden = task.state === "failed" || task.state === "cancelled";
    parts.bar.classList.toggle("progress-bar-striped", LIVE.includes(task.state));
    parts.bar.classList.toggle("progress-bar-animated", LIVE.includes(task.state));
    const total = task.bytes_total ? PF.bytes(task.bytes_total) : "unknown size";
    PF.setText(parts.text, `${PF.bytes(task.bytes_done)} of ${total}` +
      (task.files ? `, ${task.files} files` : "") + (task.state === "done" && task.path ? ` → ${task.path}` : ""));
    PF.setText(parts.error, task.error || "");
    if (item.state !== task.state) {
      parts.actions.replaceChildren(...(LIVE.includes(task.state) ? [PF.el("button", {type: "button",
        class: "btn btn-sm btn-outline-danger", "aria-label": `Cancel the download of ${task.repo_id}`,
        onclick: () => cancel(task)}, "Cancel")] : []));
      if (task.state === "done" && (started.has(task.id) || LIVE.includes(item.state))) finishedSinceLoad = true;
      item.state = task.state;
    }
  }

  function render() {
    downloads.forEach((task, index) => {
      let item = items.get(task.id);
      if (!item) {
        item = makeItem(task);
        items.set(task.id, item);
      }
      updateItem(item, task);
      if (list.children[index] !== item.li) list.insertBefore(item.li, list.children[index] || null);
    });
    empty.hidden = downloads.length > 0;
    if (finishedSinceLoad) {
      finishedSinceLoad = false;
      const box = PF.alert(notices, "success", "A download finished. ");
      box.insertBefore(PF.el("button", {type: "button", class: "btn btn-sm btn-success", onclick: rescan},
        "Show it in the inventory"), box.lastChild);
    }
  }

  async function refresh() {
    downloads = (await PF.api("GET", "/api/models/downloads")).downloads;
    render();
  }

  async function cancel(task) {
    if (!await PF.confirm(`Cancel the download of ${task.repo_id}?`, "The files downloaded so far are removed.",
      "Cancel download")) return;
    try {
      await PF.api("DELETE", `/api/models/downloads/${task.id}`);
    } catch (err) {
      PF.alert(notices, "danger", `Could not cancel: ${err.message}`);
    }
    poller.now();
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    repo.classList.remove("is-invalid");
    repo.removeAttribute("aria-invalid");
    const body = {repo_id: repo.value.trim()};
    if (revision.value.trim()) body.revision = revision.value.trim();
    try {
      started.add((await PF.api("POST", "/api/models/downloads", body)).id);
      repo.value = "";
      revision.value = "";
    } catch (err) {
      repo.classList.add("is-invalid");
      repo.setAttribute("aria-invalid", "true");
      repo.setAttribute("aria-describedby", "download-help download-error");
      PF.setText(repoError, err.message);
    }
    poller.now();
  });

  for (const button of document.querySelectorAll("[data-delete-model]")) {
    button.addEventListener("click", async () => {
      const repoId = button.dataset.deleteModel;
      if (!await PF.confirm(`Delete ${repoId}?`, "Every revision of it in your models folder is removed from disk.",
        "Delete model")) return;
      try {
        const result = await PF.api("DELETE", `/api/models/${repoId}`);
        PF.alert(notices, "success", `Deleted ${repoId}: ${PF.bytes(result.freed_bytes)} freed.`);
        button.closest("tr").remove();
      } catch (err) {
        PF.alert(notices, "danger", `Could not delete ${repoId}: ${err.message}`);
      }
    });
  }

  // Scan the model folders again (the API waits a few seconds for the scan), then show the page anew.
  async function rescan(event) {
    event.target.disabled = true;
    try {
      await PF.api("GET", "/api/models?refresh=1");
      window.location.reload();
    } catch (err) {
      PF.alert(notices, "danger", `Could not scan: ${err.message}`);
      event.target.disabled = false;
    }
  }

  document.getElementById("rescan-button").addEventListener("click", rescan);

  render();
  const anyLive = () => downloads.some((task) => LIVE.includes(task.state));
  const poller = PF.poll(refresh, () => (anyLive() ? 1000 : 10000), null, false);
})();
