"use strict";
// One service: state, timeline, phases, time left, replicas, renewal and its jobs from GET /api/services/<id>; the job
// log from
// GET /api/services/<id>/logs, followed while "Follow" is on; stop and delete with confirmation.

(() => {
  let service = PF.initial("initial-service");
  const notices = document.getElementById("service-alert");
  const log = document.getElementById("job-log");
  const follow = document.getElementById("follow-log");
  const lines = document.getElementById("log-lines");
  const stopButton = document.getElementById("stop-button");
  const deleteButton = document.getElementById("delete-button");
  const PHASES = ["queued", "job_to_endpoint", "endpoint_to_healthy", "total"];
  let shownEvents = -1;
  let shownState = null;
  let poller = null;
  let deleted = false;

  function render() {
    if (shownState !== service.state) {
      document.getElementById("state-badge").replaceChildren(PF.badge(service.state));
      shownState = service.state;
    }
    PF.setText(document.getElementById("reason"), service.reason || "");
    PF.setText(document.querySelector('[data-field="job"]'),
      service.job_id ? `${service.scheduler} job ${service.job_id}` : "not submitted");
    PF.setText(document.querySelector('[data-field="node"]'), service.node || "—");
    PF.setText(document.querySelector('[data-field="created"]'),
      `${PF.when(service.created_at)} (${PF.since(service.created_at)} ago)`);
    PF.setText(document.querySelector('[data-field="left"]'), PF.timeLeft(service));
    PF.setText(document.querySelector('[data-field="stops"]'), PF.stopsIn(service) || "never (no idle stop or lease)");
    const counts = service.replicas;
    PF.setText(document.querySelector('[data-field="replicas"]'), counts
      ? PF.replicas(service) + (counts.min !== counts.max
        ? ` (a job added above ${counts.target_in_flight} requests in flight per job)` : "")
      : "none (one job)");
    PF.setText(document.querySelector('[data-field="renewal"]'),
      PF.renewal(service) || "none (it ends at its time limit)");
    renderJobs();
    for (const phase of PHASES) {
      const seconds = (service.phases || {})[phase];
      PF.setText(document.querySelector(`[data-phase="${phase}"]`),
        seconds === null || seconds === undefined ? (PF.isLive(service) ? "…" : "—") : `${seconds.toFixed(1)} s`);
    }
    document.getElementById("playground-link").hidden = service.state !== "RUNNING";
    stopButton.hidden = !PF.isLive(service);
    deleteButton.hidden = PF.isLive(service);
    const events = service.events || [];
    if (events.length !== shownEvents) {
      document.getElementById("timeline").replaceChildren(...events.map((event) => PF.el("li",
        {class: `state-${event.to}`},
        PF.el("div", {}, PF.el("strong", {}, event.from ? `${event.from} → ${event.to}` : event.to), " ",
          PF.el("time", {datetime: event.at, class: "text-body-secondary"}, PF.when(event.at))),
        PF.el("div", {class: "text-break"}, event.reason || ""))));
      shownEvents = events.length;
    }
  }

  // A service's jobs, by generation: the current one (the service's own fields) and the others (`jobs`: a renewal's
  // successor, replicas starting or serving, the draining, the ended and the failed). Shown once there is more than
  // the first job.
  function renderJobs() {
    const others = service.jobs || [];
    const section = document.getElementById("jobs-section");
    section.hidden = others.length === 0;
    if (section.hidden) return;
    const current = {generation: service.generation || 1, job_id: service.job_id, node: service.node,
      phase: PF.isLive(service) ? "current" : "last", reason: service.reason};
    const jobs = [...others, current].sort((a, b) => a.generation - b.generation);
    const key = JSON.stringify(jobs);
    if (section.dataset.shown === key) return;
    section.dataset.shown = key;
    document.getElementById("jobs").replaceChildren(...jobs.map((job) => PF.el("tr",
      {"data-generation": String(job.generation), class: job === current ? "fw-semibold" : ""},
      PF.el("td", {}, String(job.generation)), PF.el("td", {class: "font-monospace"}, job.job_id || "—"),
      PF.el("td", {}, job.node || "—"), PF.el("td", {"data-field": "phase"}, PF.jobPhase(job)),
      PF.el("td", {class: "text-break"}, job.reason || ""))));
  }

  async function refresh() {
    if (deleted) return;
    service = await PF.api("GET", `/api/services/${service.id}`);
    render();
  }

  async function loadLog() {
    if (deleted) return;
    const answer = await PF.api("GET", `/api/services/${service.id}/logs?tail=${lines.value}`);
    const text = answer.log || "(the job log is empty so far: the job has not started)";
    if (log.textContent !== text) {
      log.textContent = text;
      if (follow.checked) log.scrollTop = log.scrollHeight;
    }
  }

  stopButton.addEventListener("click", async () => {
    try {
      if (await PF.stopService(service)) PF.alert(notices, "info", "Stopping: Slurm is cancelling the job.");
    } catch (err) {
      PF.alert(notices, "danger", `Could not stop: ${err.message}`);
    }
    poller.now();
  });
  deleteButton.addEventListener("click", async () => {
    try {
      if (await PF.deleteService(service)) {
        deleted = true;
        window.location.assign(PF.url("/"));
      }
    } catch (err) {
      PF.alert(notices, "danger", `Could not delete: ${err.message}`);
    }
  });
  follow.addEventListener("change", () => {
    if (follow.checked) logPoller.now();
  });
  lines.addEventListener("change", () => loadLog().catch((err) => PF.alert(notices, "danger", err.message)));

  render();
  poller = PF.poll(refresh, () => (PF.isLive(service) ? (service.state === "RUNNING" ? 3000 : 1000) : 10000),
    document.getElementById("refresh-status"), false);
  // The log is read while "Follow" is on, until it has been read once after the service ended.
  let logComplete = false;
  const logPoller = PF.poll(async () => {
    if ((follow.checked && !logComplete) || log.dataset.loaded !== "1") {
      const ended = !PF.isLive(service);
      await loadLog();
      log.dataset.loaded = "1";
      logComplete = ended;
    }
  }, 2000);
})();
