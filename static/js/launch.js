"use strict";
// The launch form: models filtered by kind, the revisions of the chosen model, and the tier recommended for it
// (GET /api/tiers/recommend) preselected with its reason, when each tier the model fits would start (and a tier that
// would start sooner), renewal's box and its end kept in step. The portal checks everything again on submit.

(() => {
  const data = PF.initial("launch-data");
  const kind = document.getElementById("kind");
  const model = document.getElementById("model");
  const revision = document.getElementById("revision");
  const tier = document.getElementById("tier");
  const reason = document.getElementById("tier-reason");
  const details = document.getElementById("tier-details");
  const recommended = document.getElementById("recommended_tier");
  const byRepo = new Map(data.models.map((entry) => [entry.repo_id, entry]));
  const tiers = new Map(data.tiers.map((item) => [item.ref, item]));
  const starts = new Map(); // each tier's estimated start, in words
  const LOCATIONS = {cache: "site cache (shared, read-only)", home: "your models"};
  let asked = 0; // the latest recommendation asked for; older answers are ignored

  function shortRevision(item) {
    return item.revision.slice(0, 12) + (item.refs && item.refs.length ? ` (${item.refs.join(", ")})` : "");
  }

  function parameters(count) {
    if (count >= 1e9) return `${(count / 1e9).toFixed(1)} B`;
    if (count >= 1e6) return `${(count / 1e6).toFixed(1)} M`;
    return count.toLocaleString();
  }

  function chosenRevision() {
    const entry = byRepo.get(model.value);
    if (!entry) return null;
    return entry.revisions.find((item) => item.revision === revision.value) || entry.revisions[0] || null;
  }

  function filterModels() {
    let firstVisible = null;
    for (const option of model.options) {
      const entry = byRepo.get(option.value);
      option.hidden = Boolean(entry && entry.kind && entry.kind !== kind.value);
      if (!option.hidden && firstVisible === null) firstVisible = option;
    }
    for (const help of document.querySelectorAll("[data-kind-help]")) {
      help.hidden = help.dataset.kindHelp !== kind.value;
    }
    const selected = model.selectedOptions[0];
    if ((!selected || selected.hidden) && firstVisible) {
      model.value = firstVisible.value;
      return true;
    }
    return false;
  }

  function fillRevisions(keep) {
    const entry = byRepo.get(model.value);
    const options = [PF.el("option", {value: ""}, "Default (main, else the newest)")];
    for (const item of entry ? entry.revisions : []) {
      options.push(PF.el("option", {value: item.revision},
        `${shortRevision(item)} · ${LOCATIONS[item.location] || item.location} · ${PF.bytes(item.size_bytes)}` +
        (item.complete ? "" : " · incomplete")));
    }
    if (keep && !options.some((option) => option.value === keep)) {
      options.push(PF.el("option", {value: keep}, `${keep} (not downloaded)`));
    }
    revision.replaceChildren(...options);
    revision.value = keep || "";
  }

  function showInfo() {
    const item = chosenRevision();
    const entry = byRepo.get(model.value);
    const place = (location) => LOCATIONS[location] || location;
    const elsewhere = item ? [...new Set(entry.revisions.map((r) => r.location))].filter((l) => l !== item.location) : [];
    const values = {
      location: item ? place(item.location) + (elsewhere.length ? `; also in ${elsewhere.map(place).join(", ")}` : "") :
        "not in the inventory",
      size: item ? `${PF.bytes(item.size_bytes)} on disk` +
        (item.weights_bytes ? `, ${PF.bytes(item.weights_bytes)} of weights` : "") : "—",
      format: item && item.format ? item.format : "—",
      parameters: item && item.parameters ? parameters(item.parameters) : "—",
      dtype: item && item.dtype ? item.dtype : "—",
      kind: item && item.kind ? item.kind : "—",
    };
    for (const [key, value] of Object.entries(values)) {
      PF.setText(document.querySelector(`[data-info="${key}"]`), value);
    }
  }

  function showTier() {
    const item = tiers.get(tier.value);
    if (!item) {
      PF.setText(details, "");
      return;
    }
    const gpuType = item.gpu_type ? ` (${item.gpu_type})` : "";
    const gpus = item.gpu_count ? `${item.gpu_count} GPU${item.gpu_count > 1 ? "s" : ""}${gpuType}` : "no GPU";
    const size = item.max_model_size_gb === null ? "any model size" : `models up to ${item.max_model_size_gb} GB`;
    const start = starts.get(item.ref);
    PF.setText(details, `${gpus}, ${item.cpu_cores} CPU${item.cpu_cores > 1 ? "s" : ""}, ${item.memory_gb} GB memory; ` +
      `${size}. sbatch ${item.sbatch.join(" ")}` + (start ? `. Would start: ${start}` : ""));
  }

  // When each tier would start: the page's estimates, then those of the recommendation (the tiers the model fits).
  function showStarts(answer) {
    const fitting = new Map((answer ? answer.fitting || [] : []).map((item) => [item.ref, item.start]));
    for (const cell of document.querySelectorAll("[data-start]")) {
      const ref = cell.dataset.start;
      const start = answer ? fitting.get(ref) : (tiers.get(ref) || {}).start;
      const text = start ? start.text : answer ? "too small for this model" : "";
      if (start) starts.set(ref, text); else starts.delete(ref);
      PF.setText(cell, text);
      cell.classList.toggle("text-body-secondary", Boolean(answer) && !start);
      if (start && start.at) cell.title = start.at; else cell.removeAttribute("title");
    }
  }

  function markRecommended(ref) {
    for (const option of tier.options) {
      const label = option.dataset.label || option.textContent;
      PF.setText(option, option.value === ref ? `${label} (recommended)` : label);
    }
  }

  async function recommend(select) {
    const mine = ++asked;
    recommended.value = "";
    markRecommended(null);
    if (!data.tiers.length) return;
    if (!byRepo.has(model.value)) {
      PF.setText(reason, "This model is not in the inventory: pick a tier yourself, or another model.");
      showStarts(null);
      return;
    }
    PF.setText(reason, "Finding the tier for this model…");
    const params = new URLSearchParams({model: model.value});
    if (revision.value) params.set("revision", revision.value);
    try {
      const answer = await PF.api("GET", `/api/tiers/recommend?${params}`);
      if (mine !== asked) return;
      if (answer.tier) {
        recommended.value = answer.tier.ref;
        markRecommended(answer.tier.ref);
        if (select) tier.value = answer.tier.ref;
        const when = answer.tier.start || {};
        const start = when.at ? ` It would start ${when.text}.` : when.text ? ` (${when.text})` : "";
        const sooner = answer.sooner ? ` Sooner: ${answer.sooner.reason}.` : "";
        PF.setText(reason, `Recommended: ${answer.tier.ref}, because ${answer.reason}.${start}${sooner}`);
      } else {
        PF.setText(reason, `No tier fits: ${answer.reason}.`);
      }
      showStarts(answer);
    } catch (err) {
      if (mine === asked) PF.setText(reason, `No recommendation: ${err.message}`);
    }
    showTier();
  }

  kind.addEventListener("change", () => {
    if (filterModels()) {
      fillRevisions("");
      showInfo();
      recommend(true);
    }
  });
  model.addEventListener("change", () => {
    fillRevisions("");
    showInfo();
    recommend(true);
  });
  revision.addEventListener("change", () => {
    showInfo();
    recommend(true);
  });
  tier.addEventListener("change", showTier);
  // Renewal: an end written in "until" renews the service, so it ticks the box; unticking the box clears it.
  const renew = document.getElementById("renew");
  const renewUntil = document.getElementById("renew_until");
  renewUntil.addEventListener("input", () => {
    if (renewUntil.value.trim()) renew.checked = true;
  });
  renew.addEventListener("change", () => {
    if (!renew.checked) renewUntil.value = "";
  });

  filterModels();
  showStarts(null);
  fillRevisions(revision.dataset.submitted || "");
  showInfo();
  showTier();
  recommend(!data.keep_tier);
})();
