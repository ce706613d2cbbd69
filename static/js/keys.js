"use strict";
// API keys: create (POST /api/keys; the key is shown once), list (GET /api/keys) and revoke (DELETE /api/keys/<id>).

(() => {
  const notices = document.getElementById("keys-alert");
  const form = document.getElementById("key-form");
  const name = document.getElementById("key-name");
  const nameError = document.getElementById("key-name-error");
  let keys = PF.initial("initial-keys");

  function render() {
    document.querySelector("#keys-table tbody").replaceChildren(...keys.map((key) => PF.el("tr", {"data-key-id": key.id},
      PF.el("th", {scope: "row", class: "text-break"}, key.name),
      PF.el("td", {class: "font-monospace"}, key.hint),
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

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    name.classList.remove("is-invalid");
    name.removeAttribute("aria-invalid");
    name.setAttribute("aria-describedby", "key-name-help");
    try {
      const created = await PF.api("POST", "/api/keys", {name: name.value});
      document.getElementById("new-key-name").textContent = created.name;
      document.getElementById("new-key-value").value = created.key;
      document.getElementById("new-key").hidden = false;
      name.value = "";
      await reload();
    } catch (err) {
      name.classList.add("is-invalid");
      name.setAttribute("aria-invalid", "true");
      name.setAttribute("aria-describedby", "key-name-help key-name-error");
      nameError.textContent = err.message;
    }
  });

  render();
})();
