"use strict";
// The cluster page: partitions, nodes and the user's jobs from GET /api/cluster (sinfo and squeue), refreshed.

(() => {
  const notices = document.getElementById("cluster-alert");
  let overview = PF.initial("initial-cluster");

  function fill(tableId, rows) {
    document.querySelector(`#${tableId} tbody`).replaceChildren(...rows);
  }

  function gpus(free, total, types) {
    if (!total) return "none";
    return `${free} of ${total}${types && types.length ? " (" + types.join(", ") + ")" : ""}`;
  }

  function render() {
    if (!overview) return;
    fill("partitions-table", overview.partitions.map((p) => PF.el("tr", {"data-partition": p.name},
      PF.el("th", {scope: "row"}, p.name,
        p.default ? PF.el("span", {class: "badge text-bg-light border ms-2"}, "default") : null),
      PF.el("td", {}, p.available),
      PF.el("td", {}, p.time_limit),
      PF.el("td", {}, `${p.nodes_idle} / ${p.nodes_usable} / ${p.nodes}`),
      PF.el("td", {}, `${p.cpus_idle} of ${p.cpus_total}`),
      PF.el("td", {"data-field": "gpus"}, gpus(p.gpus_free, p.gpus_total, p.gpu_types)))));
    fill("nodes-table", overview.nodes.map((n) => PF.el("tr", {"data-node": n.name},
      PF.el("th", {scope: "row"}, n.name),
      PF.el("td", {}, n.partitions.join(", ")),
      PF.el("td", {}, n.state),
      PF.el("td", {}, `${n.cpus_alloc} of ${n.cpus_total}`),
      PF.el("td", {}, n.gpus_total ? `${n.gpus_used} of ${n.gpus_total}` : "none"),
      PF.el("td", {}, `${PF.bytes(n.memory_alloc_mb * 1048576)} of ${PF.bytes(n.memory_mb * 1048576)}`))));
    fill("queue-table", overview.queue.map((job) => PF.el("tr", {"data-job-id": job.job_id},
      PF.el("th", {scope: "row", class: "font-monospace"}, job.job_id),
      PF.el("td", {class: "text-break"}, job.service_id ?
        PF.el("a", {href: PF.serviceUrl(job.service_id)}, job.name) : job.name),
      PF.el("td", {}, job.partition),
      PF.el("td", {}, job.state),
      PF.el("td", {}, job.time || job.time_limit ? `${job.time || "0:00"} / ${job.time_limit || "—"}` : "—"),
      PF.el("td", {}, job.where),
      PF.el("td", {}, job.gres || "—"))));
    document.getElementById("queue-empty").hidden = overview.queue.length > 0;
  }

  async function refresh() {
    try {
      overview = await PF.api("GET", "/api/cluster");
      notices.replaceChildren();
    } catch (err) {
      PF.alert(notices, "danger", err.message);
      throw err;
    }
    render();
  }

  render();
  const poller = PF.poll(refresh, 10000, document.getElementById("refresh-status"), false);
  document.getElementById("cluster-refresh").addEventListener("click", () => poller.now());
})();
