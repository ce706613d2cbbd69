"use strict";
// API keys: create (POST /api/keys, with scopes, models, expiry and rates; the key is shown once), list (GET /api/keys)
// and revoke (DELETE /api/keys/<id>).

(() => {
  const notices = document.getElementById("keys-alert");
  const form = document.getElementById("key-form");
  const name = document.getElementById("key-name");
  const models = document.getElementById("key-models");
  const expires = document.getElementById("key-expires");
  const rpm = document.getElementById("key-rpm");
  const tpm = document.getElementById("key-tpm");
  const scopeBoxes = Array.from(form.querySelectorAll("#key-scopes input[type=checkbox]"));
  // Each field the API may name in a refusal: its control and where its problem is shown.
  const fields = {
    name: [name, "key-name-error"], scopes: [document.getElementById("key-scopes"), "key-scopes-error"],
    models: [models, "key-models-error"], expires: [expires, "key-expires-error"],
    requests_per_minute: [rpm, "key-rpm-error"], tokens_per_minute: [tpm, "key-tpm-error"],
  };
  let keys = PF.initial("initial-keys");

  function limits(key) {
    const parts = [];
    if (key.requests_per_minute) parts.push(`${key.requests_per_minute} requests/min`);
    if (key.tokens_per_minute) parts.push(`${key.tokens_per_minute} tokens/min`);
    return parts.length ? parts.join(", ") : "unlimited";
  }

  function expiry(key) {
    if (!key.expires_at) return "never";
    return key.expired ? PF.el("span", {class: "badge text-bg-danger"}, `expired ${PF.when(key.expires_at)}`)
      : PF.when(key.expires_at);
  }

  function render() {
    document.querySelector("#keys-table tbody").replaceChildren(...keys.map((key) => PF.el("tr", {"data-key-id": key.id},
      PF.el("th", {scope: "row", class: "text-break"}, key.name),
      PF.el("td", {class: "font-monospace"}, key.hint),
      PF.el("td", {"data-field": "scopes"}, (key.scopes || []).join(", ")),
      PF.el("td", {"data-field": "models", class: "text-break"}, key.models ? key.models.join(", ") : "any"),
      PF.el("td", {"data-field": "expires"}, expiry(key)),
      PF.el("td", {"data-field": "limits"}, limits(key)),
      PF.el("td", {"data-field": "last-used"}, key.last_used_at ? PF.when(key.last_used_at) : "never"),
      PF.el("td", {}, PF.when(key.created_at)),
      PF.el("td", {class: "actions"}, PF.el("button", {type: "button", class: "btn btn-sm btn-outline-danger",
        "aria-label": `Revoke ${key.name}`, onclick: () => revoke(key)}, "Revoke")))));
    document.getElementById("keys-empty").hidden = keys.length > 0;
  }

  async function reload() {
    keys = (await PF.api("GET", "/api/keys")).keys;
    render();
  }

  async function revoke(key) {
    const message = "Scripts using this key are refused within seconds.";
    if (!await PF.confirm(`Revoke ${key.name}?`, message, "Revoke key")) return;
    try {
      await PF.api("DELETE", `/api/keys/${key.id}`);
      PF.alert(notices, "success", `Revoked ${key.name}.`);
      await reload();
    } catch (err) {
      PF.alert(notices, "danger", `Could not revoke ${key.name}: ${err.message}`);
    }
  }

  const problems = PF.fieldProblems(fields);
  const clearProblems = problems.clear;

  function showProblem(field, message) {
    problems.show(field in fields ? field : "name", message);
  }

  // A number field as the API takes it: left out when empty, a number when it reads as one, else the text (which the
  // API refuses, naming the field).
  function number(input) {
    const text = input.value.trim();
    if (!text) return undefined;
    return Number.isNaN(Number(text)) ? text : Number(text);
  }

  function body() {
    const request = {name: name.value, scopes: scopeBoxes.filter((box) => box.checked).map((box) => box.value)};
    const chosen = Array.from(models.selectedOptions).map((option) => option.value);
    if (chosen.length) request.models = chosen;
    if (expires.value.trim()) request.expires = expires.value.trim();
    const requests = number(rpm);
    if (requests !== undefined) request.requests_per_minute = requests;
    const tokens = number(tpm);
    if (tokens !== undefined) request.tokens_per_minute = tokens;
    return request;
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearProblems();
    for (const [field, [control]] of Object.entries(fields)) {  // a number the browser cannot read is sent as ""
      if (control.validity && control.validity.badInput) return showProblem(field, "expected a whole number");
    }
    try {
      const created = await PF.api("POST", "/api/keys", body());
      document.getElementById("new-key-name").textContent = created.name;
      document.getElementById("new-key-value").value = created.key;
      document.getElementById("new-key").hidden = false;
      form.reset();
      await reload();
    } catch (err) {
      showProblem(err.field in fields ? err.field : "name", err.message);
    }
  });

  render();
})();
