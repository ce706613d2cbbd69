"use strict";
// Batches (the Batches page and one batch's page), through OpenAI's Files and Batches API under /v1: the list with a
// progress bar per batch (GET /v1/batches, polled while a batch is live; a live batch's shards from GET
// /v1/batches/<id>), the form that uploads a JSONL file (POST /v1/files) and starts a batch (POST /v1/batches), and a
// batch's shards, jobs and events, polled until it ends, with cancel (POST /v1/batches/<id>/cancel).

const Batches = (() => {
  const ENDED = ["completed", "failed", "expired", "cancelled"];
  const BADGES = {
    validating: "text-bg-secondary", in_progress: "text-bg-primary", finalizing: "text-bg-info",
    completed: "text-bg-success", failed: "text-bg-danger", expired: "text-bg-dark", cancelling: "text-bg-warning",
    cancelled: "text-bg-secondary",
  };

  function isLive(batch) {
    return !ENDED.includes(batch.status);
  }

  function badge(batch) {
    return PF.el("span", {class: `badge ${BADGES[batch.status] || "text-bg-secondary"}`, "data-status": batch.status},
      batch.status.replace("_", " "));
  }

  function counts(batch) {
    const c = batch.request_counts || {};
    return `${c.completed || 0} done, ${c.failed || 0} failed of ${c.total || 0}`;
  }

  // One bar per batch: lines answered (green) and failed (red) of its total; aria-valuenow is the share of lines
  // finished either way.
  function progress(batch) {
    const c = batch.request_counts || {};
    const total = c.total || 0;
    const share = (n) => (total ? (100 * (n || 0)) / total : 0);
    const finished = Math.round(share((c.completed || 0) + (c.failed || 0)));
    const bar = PF.el("div", {class: "progress", role: "progressbar", "aria-label": `Progress of ${batch.id}`,
      "aria-valuemin": "0", "aria-valuemax": "100", "aria-valuenow": String(finished), "aria-valuetext": counts(batch),
      "data-completed": String(c.completed || 0), "data-failed": String(c.failed || 0), "data-total": String(total)},
    PF.el("div", {class: `progress-bar bg-success${isLive(batch) ? " progress-bar-striped progress-bar-animated" : ""}`,
      "data-part": "completed"}),
    PF.el("div", {class: "progress-bar bg-danger", "data-part": "failed"}));
    bar.querySelector('[data-part="completed"]').style.width = `${share(c.completed)}%`;
    bar.querySelector('[data-part="failed"]').style.width = `${share(c.failed)}%`;
    return bar;
  }

  // The shards of a batch with detail: "2 of 4 running (jobs 41_0, 41_1), 1 done"; without: "4 shards".
  function shards(batch) {
    const list = (batch.pilotfish || {}).shards;
    if (!Array.isArray(list)) return list === undefined ? "" : `${list} shard${list === 1 ? "" : "s"}`;
    const states = {};
    for (const shard of list) states[shard.state] = (states[shard.state] || 0) + 1;
    const running = list.filter((shard) => shard.state === "running");
    const jobs = running.map((shard) => shard.job_id).filter(Boolean);
    const on = jobs.length ? ` (job${jobs.length === 1 ? "" : "s"} ${jobs.join(", ")})` : "";
    const words = [`${running.length} of ${list.length} running${on}`];
    for (const [state, count] of Object.entries(states)) {
      if (state !== "running") words.push(`${count} ${state.replace("_", " ")}`);
    }
    return words.join(", ");
  }

  function fileLink(batch, which) {
    const id = which === "output" ? batch.output_file_id : batch.error_file_id;
    if (!id) return null;
    const label = which === "output" ? "Output" : "Errors";
    return PF.el("a", {href: PF.url(`/v1/files/${encodeURIComponent(id)}/content`),
      download: `${batch.id}.${which === "output" ? "output" : "errors"}.jsonl`, class: "me-2",
      "aria-label": `${label} of ${batch.id}`, "data-file": which}, label);
  }

  function files(batch) {
    const links = [fileLink(batch, "output"), fileLink(batch, "errors")].filter(Boolean);
    if (links.length) return links;
    return [isLive(batch) ? "when it ends" : "none"];
  }

  function epochWhen(seconds) {
    return seconds ? new Date(seconds * 1000).toLocaleString() : "—";
  }

  function batchUrl(id) {
    return PF.url(`/ui/batches/${encodeURIComponent(id)}`);
  }

  return {ENDED, isLive, badge, counts, progress, shards, files, epochWhen, batchUrl};
})();

// --- the list and the form -------------------------------------------------------------------------------

function batchesPage() {
  const notices = document.getElementById("batches-alert");
  const form = document.getElementById("batch-form");
  const file = document.getElementById("batch-file");
  const endpoint = document.getElementById("batch-endpoint");
  const tier = document.getElementById("batch-tier");
  const time = document.getElementById("batch-time");
  const shardSize = document.getElementById("batch-shard-size");
  const concurrency = document.getElementById("batch-concurrency");
  const submit = document.getElementById("batch-submit");
  const formStatus = document.getElementById("batch-form-status");
  const listed = PF.initial("batches-listed");
  // Each field the API may name in a refusal (OpenAI's `param`): its control and where its problem is shown.
  const fields = {
    input_file_id: [file, "batch-file-error"], file: [file, "batch-file-error"], purpose: [file, "batch-file-error"],
    endpoint: [endpoint, "batch-endpoint-error"], "metadata.tier": [tier, "batch-tier-error"],
    "metadata.time": [time, "batch-time-error"], "metadata.shard_size": [shardSize, "batch-shard-size-error"],
    "metadata.concurrency": [concurrency, "batch-concurrency-error"],
  };
  let batches = PF.initial("initial-batches");
  const details = new Map(); // id -> the batch with its shards (live batches)

  function row(batch) {
    const shown = details.get(batch.id) || batch;
    return PF.el("tr", {"data-batch-id": batch.id},
      PF.el("th", {scope: "row"}, PF.el("a", {href: Batches.batchUrl(batch.id), class: "font-monospace text-break"},
        batch.id)),
      PF.el("td", {"data-field": "status"}, Batches.badge(batch)),
      PF.el("td", {"data-field": "progress"}, Batches.progress(batch),
        PF.el("div", {class: "small text-body-secondary", "data-field": "counts"}, Batches.counts(batch))),
      PF.el("td", {class: "text-break"}, batch.model || "—",
        PF.el("div", {class: "small text-body-secondary"}, batch.endpoint),
        ...((batch.pilotfish || {}).folder
          ? [PF.el("div", {class: "small text-body-secondary text-break", "data-field": "folder"},
            `${batch.pilotfish.folder.source} → ${batch.pilotfish.folder.output}`)] : [])),
      PF.el("td", {"data-field": "shards", class: "small"}, Batches.shards(shown)),
      PF.el("td", {class: "small"}, Batches.epochWhen(batch.created_at)),
      PF.el("td", {"data-field": "files", class: "small"}, ...Batches.files(batch)));
  }

  function render() {
    document.querySelector("#batches-table tbody").replaceChildren(...batches.map(row));
    document.getElementById("batches-empty").hidden = batches.length > 0;
  }

  async function reload() {
    batches = (await PF.api("GET", `/v1/batches?limit=${listed}`)).data;
    const live = batches.filter(Batches.isLive);
    const fetched = await Promise.all(live.map((batch) => PF.api("GET", `/v1/batches/${batch.id}`)));
    details.clear();
    for (const batch of fetched) details.set(batch.id, batch);
    batches = batches.map((batch) => details.get(batch.id) || batch);
    render();
  }

  const problems = PF.fieldProblems(fields);

  function clearProblems() {
    problems.clear();
    notices.replaceChildren();
  }

  // A refusal next to its field; one the form has no field for above it.
  function showProblem(field, message) {
    if (!problems.show(field, message)) PF.alert(notices, "danger", message);
  }

  async function upload(chosen) {
    const body = new FormData();
    body.append("purpose", "batch");
    body.append("file", chosen, chosen.name);
    let response;
    try {
      response = await fetch(PF.url("/v1/files"), {method: "POST", credentials: "same-origin", body,
        headers: {Accept: "application/json", "X-CSRF-Token": PF.csrf}});
    } catch (err) {
      throw new PF.ApiError("the portal does not answer (is it still running?)", 0, "file");
    }
    if (!response.ok) throw new PF.ApiError(await PF.errorMessage(response), response.status, "file");
    return response.json();
  }

  function metadata() {
    const values = {tier: tier.value, time: time.value.trim(), shard_size: shardSize.value.trim(),
      concurrency: concurrency.value.trim()};
    const chosen = Object.fromEntries(Object.entries(values).filter(([, value]) => value));
    return Object.keys(chosen).length ? chosen : undefined;
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearProblems();
    const chosen = file.files[0];
    if (!chosen) {
      showProblem("file", "choose a JSONL file of requests");
      return;
    }
    submit.disabled = true;
    let uploaded = null;
    try {
      PF.setText(formStatus, `Uploading ${chosen.name}…`);
      uploaded = await upload(chosen);
      PF.setText(formStatus, "Checking every line and starting…");
      const body = {input_file_id: uploaded.id, endpoint: endpoint.value, completion_window: "24h"};
      const extra = metadata();
      if (extra) body.metadata = extra;
      const created = await PF.api("POST", "/v1/batches", body);
      form.reset();
      PF.alert(notices, "success", PF.el("span", {}, "Started ",
        PF.el("a", {href: Batches.batchUrl(created.id), class: "alert-link font-monospace"}, created.id),
        `: ${Batches.counts(created)}.`));
      poller.now();  // shown at once, then followed at the live pace
    } catch (err) {
      if (uploaded && err.status >= 400 && err.status < 500) {  // refused: the upload is not kept
        PF.api("DELETE", `/v1/files/${uploaded.id}`).catch(() => {});
      }
      showProblem(err.field in fields ? err.field : (uploaded ? null : "file"), err.message);
    } finally {
      PF.setText(formStatus, "");
      submit.disabled = false;
    }
  });

  render();
  const pace = () => (batches.some(Batches.isLive) ? 1500 : 10000);
  const poller = PF.poll(reload, pace, document.getElementById("refresh-status"), false);
}

// --- one batch --------------------------------------------------------------------------------------------

function batchPage() {
  let batch = PF.initial("initial-batch");
  const notices = document.getElementById("batch-alert");
  const cancelButton = document.getElementById("cancel-button");

  // As the service page words them: 10 min, partition cpu, 1 CPU, 0.25 GB memory, 1 GPU (a100).
  function resourceWords(r) {
    const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;
    return [r.time && `${r.time} min`, r.partition && `partition ${r.partition}`, r.account && `account ${r.account}`,
      r.cpus && plural(r.cpus, "CPU"), r.memory_gb && `${r.memory_gb} GB memory`,
      r.gres ? `GRES ${r.gres}` : r.gpus && `${plural(r.gpus, "GPU")}${r.gpu_type ? ` (${r.gpu_type})` : ""}`,
      r.constraint && `constraint ${r.constraint}`].filter(Boolean).join(", ");
  }

  function detail(label, value, field) {
    return [PF.el("dt", {class: "col-4"}, label), PF.el("dd", {class: "col-8 text-break", "data-field": field}, value)];
  }

  function render() {
    const extra = batch.pilotfish || {};
    document.getElementById("status-badge").replaceChildren(Batches.badge(batch));
    PF.setText(document.getElementById("batch-reason"), extra.reason || "");
    document.getElementById("batch-progress").replaceChildren(Batches.progress(batch));
    PF.setText(document.getElementById("batch-counts"), `${Batches.counts(batch)}; ${Batches.shards(batch)}`);
    document.getElementById("batch-files").replaceChildren("Files: ", ...Batches.files(batch));
    const resources = resourceWords(extra.resources || {});
    const ended = ["completed", "failed", "expired", "cancelled"].find((name) => batch[`${name}_at`]);
    document.getElementById("batch-details").replaceChildren(
      ...detail("Endpoint", batch.endpoint, "endpoint"), ...detail("Model", batch.model || "—", "model"),
      ...(extra.folder
        ? detail("Folder", `${extra.folder.source} → ${extra.folder.output} (${extra.folder.format})`, "folder")
        : detail("Input file", batch.input_file_id, "input")),
      ...detail("Tier", extra.tier || "explicit resources", "tier"),
      ...detail("Resources", resources || "—", "resources"),
      ...detail("Each task", `${extra.time_limit} min, up to ${extra.shard_size} lines, ${extra.concurrency} requests in flight`, "task"),
      ...detail("Scheduler", `${extra.scheduler}, engine ${extra.engine}`, "scheduler"),
      ...detail("Created", Batches.epochWhen(batch.created_at), "created"),
      ...detail(ended ? `${ended[0].toUpperCase()}${ended.slice(1)}` : "Expires",
        Batches.epochWhen(ended ? batch[`${ended}_at`] : batch.expires_at), "ended"),
      ...(batch.errors ? detail("Problems", batch.errors.data.map((e) => e.message).join("; "), "problems") : []));
    document.querySelector("#shards-table tbody").replaceChildren(...(extra.shards || []).map((shard) =>
      PF.el("tr", {"data-shard": String(shard.index)},
        PF.el("th", {scope: "row"}, String(shard.index)),
        PF.el("td", {class: "font-monospace", "data-field": "job"}, shard.job_id || "—"),
        PF.el("td", {"data-field": "state"}, shard.state.replace("_", " ")),
        PF.el("td", {}, shard.node || "—"),
        PF.el("td", {"data-field": "attempts"}, String(shard.attempts)),
        PF.el("td", {"data-field": "answered"}, `${shard.completed} done, ${shard.failed} failed of ${shard.lines}`),
        PF.el("td", {class: "text-break"}, shard.reason || ""))));
    document.getElementById("batch-events").replaceChildren(...(extra.events || []).map((event) =>
      PF.el("li", {},
        PF.el("span", {class: "fw-semibold"}, event.from && event.from !== event.to ? `${event.from} → ${event.to}` : event.to),
        ` ${PF.when(event.at)}`, PF.el("div", {class: "text-body-secondary"}, event.reason || ""))));
    cancelButton.hidden = !Batches.isLive(batch) || batch.status === "cancelling";
  }

  cancelButton.addEventListener("click", async () => {
    const ok = await PF.confirm(`Cancel ${batch.id}?`,
      "Its Slurm tasks are cancelled; what was answered is kept in its output and error files.", "Cancel batch");
    if (!ok) return;
    try {
      batch = Object.assign(await PF.api("POST", `/v1/batches/${batch.id}/cancel`), {pilotfish: batch.pilotfish});
      render();
      watcher.now();
    } catch (err) {
      PF.alert(notices, "danger", `Could not cancel ${batch.id}: ${err.message}`);
    }
  });

  render();
  const watcher = PF.poll(async () => {  // the page came with the batch as it is: the first look after an interval
    batch = await PF.api("GET", `/v1/batches/${batch.id}`);
    render();
    if (!Batches.isLive(batch)) watcher.stop();
  }, 1500, document.getElementById("refresh-status"), false);
  if (!Batches.isLive(batch)) watcher.stop();
}

if (document.getElementById("batch-form")) batchesPage();
if (document.getElementById("batch-detail")) batchPage();
