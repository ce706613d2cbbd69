"use strict";
// The launch form: models filtered by the kinds they can be launched as, the revisions of the chosen model, the
// options that apply to it as the chosen kind (GET /api/launch-options: the flags it gets from what it is, and the
// engine flags that apply), the tier recommended for it (GET /api/tiers/recommend) preselected with its reason, when
// each tier the model fits would start (and a tier that would start sooner), renewal's box and its end kept in step.
// The portal checks everything again on submit.

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

  function kindsOf(entry) {
    return entry ? entry.kinds || (entry.kind ? [entry.kind] : []) : [];
  }

  function filterModels() {
    let firstVisible = null;
    for (const option of model.options) {
      const kinds = kindsOf(byRepo.get(option.value));
      option.hidden = kinds.length > 0 && !kinds.includes(kind.value);
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
      kind: item && item.kind ? `${item.kind}` + (item.kind_reason ? `: ${item.kind_reason}` : "") : "—",
      kinds: item ? (kindsOf(item).join(", ") || "any kind (nothing known about it)") : "—",
      modalities: item ? ((item.modalities || []).join(", ") || "unknown") : "—",
      adapters: entry && entry.adapters && entry.adapters.length ? entry.adapters.join(", ") : "none local",
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

  // What applies to this model as this kind: the flags it gets from what it is (each replaced by a flag of the user's
  // own among its yields_to), and the engine flags the site allows for the kind.
  const engineArgs = document.getElementById("engine_args");
  let options = null;
  let askedOptions = 0;

  function givenFlags() {
    return new Set(engineArgs.value.split(/\s+/).filter((word) => word.startsWith("-")).map((word) => word.split("=")[0]));
  }

  function showPresets() {
    const list = document.getElementById("options-presets");
    const presets = options ? options.presets : [];
    if (!presets.length) {
      list.replaceChildren(PF.el("li", {class: "text-body-secondary"}, "None."));
      return;
    }
    const given = givenFlags();
    list.replaceChildren(...presets.map((preset) => {
      const replaced = preset.yields_to.some((flag) => given.has(flag));
      return PF.el("li", {"data-preset": preset.purpose, "data-applied": replaced ? "0" : "1"},
        `${preset.purpose}: `, PF.el("code", {}, preset.flags.join(" ")),
        replaced ? " (replaced by your engine options)" : ` (${preset.reason}; ${preset.yields_to.join(" or ")} ` +
          "of yours replaces it)");
    }));
  }

  // The adapters a launch of this model as this kind may serve (the options' answer), as boxes to tick; those ticked
  // before (or sent with a form shown again) stay ticked while the model keeps them.
  const adaptersField = document.getElementById("adapters-field");
  let ticked = new Set(JSON.parse(adaptersField.dataset.submitted || "[]"));

  function showAdapters() {
    const names = options && options.serves_adapters ? options.adapters : [];
    for (const box of adaptersField.querySelectorAll("input[name=adapters]")) {
      if (!box.checked) ticked.delete(box.value); else ticked.add(box.value);
    }
    document.getElementById("adapters").replaceChildren(...names.map((name, index) => PF.el("div", {class: "form-check"},
      PF.el("input", {class: "form-check-input", type: "checkbox", name: "adapters", value: name,
                      id: `adapter-${index}`, checked: ticked.has(name)}),
      PF.el("label", {class: "form-check-label", for: `adapter-${index}`}, name))));
    adaptersField.hidden = !names.length;
  }

  async function showOptions() {
    const mine = ++askedOptions;
    const engine = document.getElementById("options-engine");
    const flags = document.getElementById("options-flags");
    options = null;
    const kinds = kindsOf(byRepo.get(model.value));
    if (!byRepo.has(model.value) || (kinds.length && !kinds.includes(kind.value))) {
      PF.setText(engine, byRepo.has(model.value) ? `This model is launched as ${kinds.join(" or ")}, not ${kind.value}.` :
        "This model is not in the inventory.");
      PF.setText(flags, "—");
      showPresets();
      showAdapters();
      return;
    }
    const params = new URLSearchParams({model: model.value, kind: kind.value});
    if (revision.value) params.set("revision", revision.value);
    try {
      const answer = await PF.api("GET", `/api/launch-options?${params}`);
      if (mine !== askedOptions) return;
      options = answer;
      PF.setText(engine, `${answer.kind} on ${answer.engine_title}` +
        (answer.kinds.length > 1 ? `; this model can also be launched as ${answer.kinds.filter((k) => k !== answer.kind).join(", ")}` : ""));
      PF.setText(flags, answer.flags.join(" ") || "none");
    } catch (err) {
      if (mine !== askedOptions) return;
      PF.setText(engine, `Not available: ${err.message}`);
      PF.setText(flags, "—");
    }
    showPresets();
    showAdapters();
  }

  engineArgs.addEventListener("input", showPresets);
  kind.addEventListener("change", () => {
    if (filterModels()) {
      fillRevisions("");
      showInfo();
      recommend(true);
    }
    showOptions();
  });
  model.addEventListener("change", () => {
    fillRevisions("");
    showInfo();
    recommend(true);
    showOptions();
  });
  revision.addEventListener("change", () => {
    showInfo();
    recommend(true);
    showOptions();
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
  showOptions();
})();
