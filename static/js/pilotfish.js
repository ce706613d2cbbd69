"use strict";
// Shared by every page: the portal's base URL and CSRF token (both from the page), JSON calls, formatting,
// the confirmation dialog and small DOM helpers. Data from the portal only ever reaches the page as text.

// The CSRF token: in the page at bare paths; under Open OnDemand's prefix (an origin every app of every user shares,
// whose pages can read this portal's pages with its cookie) no page carries it: the login's redirect hands it to the
// tab that signed in (#pf-csrf=...), which keeps it in its own sessionStorage (docs/security.md).
function tabCsrf() {
  const key = "pilotfish-csrf:" + (document.body.dataset.baseUrl || "");
  const handed = new URLSearchParams(window.location.hash.slice(1)).get("pf-csrf");
  if (handed) {
    window.sessionStorage.setItem(key, handed);
    window.history.replaceState(window.history.state, "", window.location.pathname + window.location.search);
  }
  const meta = document.querySelector('meta[name="csrf-token"]');
  return (meta && meta.content) || window.sessionStorage.getItem(key) || "";
}

const PF = (() => {
  const base = document.body.dataset.baseUrl || "";
  const csrf = tabCsrf();
  const LIVE = ["SUBMITTED", "PENDING", "STARTING", "RUNNING", "UNHEALTHY", "SCALED_TO_ZERO"];
  const BADGES = {
    SUBMITTED: "text-bg-secondary", PENDING: "text-bg-info", STARTING: "text-bg-primary", RUNNING: "text-bg-success",
    UNHEALTHY: "text-bg-warning", STOPPED: "text-bg-secondary", FAILED: "text-bg-danger", TIMEOUT: "text-bg-dark",
    SCALED_TO_ZERO: "text-bg-light",
  };
  let skewMs = 0; // the portal's clock minus the browser's, from the Date header of each answer

  class ApiError extends Error {
    constructor(message, status, field) {
      super(message);
      this.status = status;
      this.field = field || null;
    }
  }

  function url(path) {
    return base + path;
  }

  async function errorMessage(response) {
    let data = null;
    try {
      data = await response.json();
    } catch (err) {
      return `HTTP ${response.status} ${response.statusText}`;
    }
    const error = data && data.error;
    if (typeof error === "string") return error;
    if (error && error.message) return error.message;
    return `HTTP ${response.status} ${response.statusText}`;
  }

  function signIn() {
    window.location.assign(url("/login?next=" + encodeURIComponent(window.location.pathname + window.location.search)));
  }

  // A call to the portal's JSON API; throws ApiError with the API's own message (and the field, for bad input).
  async function api(method, path, body) {
    const options = {method, headers: {Accept: "application/json"}, credentials: "same-origin"};
    if (method !== "GET") {
      if (!csrf) { // a tab that did not sign in itself (under Open OnDemand): it may read, not change anything
        signIn();
        throw new ApiError("this tab is not signed in: sign in again", 403);
      }
      options.headers["X-CSRF-Token"] = csrf;
    }
    if (body !== undefined) {
      options.headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(url(path), options);
    } catch (err) {
      throw new ApiError("the portal does not answer (is it still running?)", 0);
    }
    const date = Date.parse(response.headers.get("Date") || "");
    if (!Number.isNaN(date)) skewMs = date - Date.now();
    if (response.status === 401) {
      signIn();
      throw new ApiError("signed out: sign in again", 401);
    }
    if (!response.ok) {
      let field = null;
      const message = await errorMessage(response.clone());
      try {
        const data = await response.json();  // the REST API names a field; OpenAI's shape under /v1, a param
        field = data.field || (data.error && typeof data.error === "object" ? data.error.param : null);
      } catch (err) {
        field = null;
      }
      throw new ApiError(message, response.status, field);
    }
    return response.json();
  }

  function now() {
    return Date.now() + skewMs;
  }

  // Runs `task` now (or after the first interval, when the page came with fresh data) and again `intervalMs` after
  // each run ends; a failing run shows in `status` and polling goes on. `intervalMs` may be a function.
  function poll(task, intervalMs, status, startNow = true) {
    let timer = null;
    let stopped = false;
    const interval = () => (typeof intervalMs === "function" ? intervalMs() : intervalMs);
    async function run() {
      try {
        await task();
        if (status) status.textContent = `Updated ${new Date().toLocaleTimeString()}`;
      } catch (err) {
        if (status) status.textContent = `Not updated: ${err.message}`;
      }
      if (!stopped) timer = window.setTimeout(run, interval());
    }
    if (startNow) run();
    else timer = window.setTimeout(run, interval());
    return {
      stop() {
        stopped = true;
        window.clearTimeout(timer);
      },
      now() {
        window.clearTimeout(timer);
        run();
      },
    };
  }

  // --- formatting ------------------------------------------------------------------------------------

  function duration(seconds) {
    if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return "—";
    seconds = Math.max(0, Math.round(seconds));
    if (seconds < 60) return `${seconds} s`;
    const minutes = Math.floor(seconds / 60);
    if (minutes < 10) return `${minutes} min ${seconds % 60} s`;
    if (minutes < 60) return `${minutes} min`;
    const hours = Math.floor(minutes / 60);
    if (hours < 24) return `${hours} h ${String(minutes % 60).padStart(2, "0")} min`;
    return `${Math.floor(hours / 24)} d ${hours % 24} h`;
  }

  function since(iso) {
    return iso ? duration((now() - Date.parse(iso)) / 1000) : "—";
  }

  function when(iso) {
    return iso ? new Date(iso).toLocaleString() : "—";
  }

  function bytes(count) {
    if (count === null || count === undefined) return "—";
    const units = ["bytes", "kB", "MB", "GB", "TB"];
    let value = count;
    for (const unit of units) {
      if (value < 1000 || unit === "TB") return unit === "bytes" ? `${value} bytes` : `${value.toFixed(1)} ${unit}`;
      value /= 1000;
    }
    return `${count} bytes`;
  }

  function isLive(service) {
    return LIVE.includes(service.state);
  }

  // What is left of the job's time limit: counted from the job's start; before it, the whole limit.
  function timeLeft(service) {
    if (!isLive(service)) return "—";
    if (service.state === "SCALED_TO_ZERO") return "no job while unused (a request starts one)";
    const limit = service.time_limit * 60;
    if (!service.job_started_at) return `${duration(limit)} (not started)`;
    return duration(limit - (now() - Date.parse(service.job_started_at)) / 1000);
  }

  // When the portal stops an unused service (its idle timeout or lease: stops_at), if nobody uses it: "" for never.
  function stopsIn(service) {
    if (!isLive(service) || !service.stops_at) return "";
    const reason = service.stop_reason_expected ? ` (${service.stop_reason_expected})` : "";
    return `stops in ${duration((Date.parse(service.stops_at) - now()) / 1000)} if unused${reason}`;
  }

  // A renewed service's renewal (renew, renew_until, generation: the current job's): "renews until stopped
  // (generation 3)", "renews until <time> (in 5 h 00 min; generation 1)"; "" for a service that is not renewed.
  function renewal(service) {
    if (!service.renew) return "";
    const generation = `generation ${service.generation || 1}`;
    if (!isLive(service)) return `renewed (${generation} was its last)`;
    if (!service.renew_until) return `renews until stopped (${generation})`;
    const left = (Date.parse(service.renew_until) - now()) / 1000;
    return `renews until ${when(service.renew_until)} (${left > 0 ? `in ${duration(left)}; ` : ""}${generation})`;
  }

  // A service's replicas (replicas: {min, max, target_in_flight, serving}): "2 of 1:3 serving" (serving: the API's
  // count, the current job while RUNNING and the replicas that answered); "" for a service of one job.
  function replicas(service) {
    const counts = service.replicas;
    if (!counts) return "";
    const span = counts.min === counts.max ? `${counts.min}` : `${counts.min}:${counts.max}`;
    return counts.serving === undefined ? `${span} jobs` : `${counts.serving} of ${span} serving`;
  }

  // A job's phase as the Jobs tables show it: a replica says whether it serves (it answered its health check) or is
  // still starting.
  function jobPhase(job) {
    if (job.phase !== "replica") return job.phase;
    return job.ready_at ? "replica, serving" : "replica, starting";
  }

  // --- DOM ---------------------------------------------------------------------------------------------

  // el("a", {href: x, class: "y"}, "text", child): attributes are set as attributes, children as text or nodes.
  function el(tag, attributes, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attributes || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : value);
    }
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function setText(node, text) {
    if (node && node.textContent !== text) node.textContent = text;
  }

  function badge(state) {
    return el("span", {class: `badge ${BADGES[state] || "text-bg-secondary"}`, "data-state": state}, state);
  }

  function alert(container, kind, message) {
    const box = el("div", {class: `alert alert-${kind} alert-dismissible`, role: kind === "danger" ? "alert" : "status"},
      message, el("button", {type: "button", class: "btn-close", "data-bs-dismiss": "alert", "aria-label": "Close"}));
    container.replaceChildren(box);
    return box;
  }

  // A form's refusals next to their fields. `fields`: {field: [control, id of its feedback element]}. A control's
  // first aria-describedby id is its help; a shown refusal is added after it.
  function fieldProblems(fields) {
    const help = (control) => control.getAttribute("aria-describedby").split(" ")[0];
    return {
      clear() {
        for (const [control, errorId] of Object.values(fields)) {
          control.classList.remove("is-invalid");
          control.removeAttribute("aria-invalid");
          control.setAttribute("aria-describedby", help(control));
          const error = document.getElementById(errorId);
          error.textContent = "";
          error.classList.remove("d-block");
        }
      },
      // Shows `message` next to `field`'s control; false (nothing shown) for a field the form does not have.
      show(field, message) {
        if (!(field in fields)) return false;
        const [control, errorId] = fields[field];
        control.classList.add("is-invalid");
        control.setAttribute("aria-invalid", "true");
        const error = document.getElementById(errorId);
        error.textContent = message;
        error.classList.add("d-block"); // a fieldset's feedback is not its control's sibling
        control.setAttribute("aria-describedby", `${help(control)} ${errorId}`);
        return true;
      },
    };
  }

  function initial(id) {
    return JSON.parse(document.getElementById(id).textContent);
  }

  // The confirmation dialog: resolves true when the user confirms, false when they cancel (Escape, Cancel, ×).
  function confirm(title, message, action) {
    const dialog = document.getElementById("confirm-dialog");
    const button = document.getElementById("confirm-action");
    document.getElementById("confirm-title").textContent = title;
    document.getElementById("confirm-message").textContent = message;
    button.textContent = action;
    const modal = bootstrap.Modal.getOrCreateInstance(dialog);
    return new Promise((resolve) => {
      let confirmed = false;
      const onConfirm = () => {
        confirmed = true;
        modal.hide();
      };
      button.addEventListener("click", onConfirm);
      dialog.addEventListener("shown.bs.modal", () => button.focus(), {once: true});
      dialog.addEventListener("hidden.bs.modal", () => {
        button.removeEventListener("click", onConfirm);
        resolve(confirmed);
      }, {once: true});
      modal.show();
    });
  }

  async function copyText(text) {
    if (navigator.clipboard && window.isSecureContext) {
      await navigator.clipboard.writeText(text);
      return;
    }
    const area = el("textarea", {class: "visually-hidden", "aria-hidden": "true"});
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }

  // Buttons with data-copy="<element id>" copy that element's text (or value).
  function copyButtons(root) {
    for (const button of (root || document).querySelectorAll("[data-copy]")) {
      button.addEventListener("click", async () => {
        const source = document.getElementById(button.dataset.copy);
        const label = button.textContent;
        try {
          await copyText(source.value !== undefined ? source.value : source.textContent);
          button.textContent = "Copied";
        } catch (err) {
          button.textContent = "Select and copy by hand";
        }
        window.setTimeout(() => { button.textContent = label; }, 1500);
      });
    }
  }

  // --- service actions (dashboard and service page) ----------------------------------------------------

  async function stopService(service) {
    const ok = await confirm(`Stop ${service.name}?`,
      `This cancels Slurm job ${service.job_id || "(not submitted)"}; the service stops answering.`, "Stop service");
    if (!ok) return null;
    return api("POST", `/api/services/${service.id}/stop`);
  }

  async function deleteService(service) {
    const ok = await confirm(`Delete ${service.name}?`,
      "This forgets the service and removes its job folder (its log and job script).", "Delete service");
    if (!ok) return false;
    await api("DELETE", `/api/services/${service.id}`);
    return true;
  }

  function serviceUrl(id, page) {
    return url(`/ui/services/${encodeURIComponent(id)}${page ? "/" + page : ""}`);
  }

  document.addEventListener("DOMContentLoaded", () => {
    // Addresses the portal writes as paths (it never builds a URL from a request's Host header): this page's origin.
    for (const input of document.querySelectorAll("input[data-from-origin]")) {
      input.value = window.location.origin + input.value;
    }
    copyButtons();
  });
  // HTML forms (sign out, launch, benchmarks) send the token as a hidden field, which a page under a shared origin
  // leaves empty: it is filled in from this tab's copy as the form is sent. Signing out forgets the copy.
  document.addEventListener("submit", (event) => {
    const form = event.target;
    for (const field of form.querySelectorAll('input[name="csrf_token"]')) field.value = csrf;
    if (/\/logout$/.test(form.getAttribute("action") || "")) {
      window.sessionStorage.removeItem("pilotfish-csrf:" + base);
    }
  }, true);

  return {
    base, csrf, LIVE, ApiError, url, api, errorMessage, poll, now, duration, since, when, bytes, isLive, timeLeft, stopsIn,
    renewal, replicas, jobPhase, el, setText, badge, alert, fieldProblems, initial, confirm, copyButtons, stopService, deleteService,
    serviceUrl,
  };
})();
