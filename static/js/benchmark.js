"use strict";
// One benchmark run: its progress while it runs (GET /api/benchmarks/<id>, about once a second), cancel and delete,
// and once it is done its figures, the latency distribution (histograms of TTFT and end-to-end latency) and, for a
// sweep, throughput and TTFT against the client count; every plot has a table of the same numbers.

(() => {
  const F = BenchmarkFigures;
  const el = PF.el;
  let run = PF.initial("initial-run");
  const notices = document.getElementById("run-alert");
  const cancelButton = document.getElementById("cancel-button");
  const deleteButton = document.getElementById("delete-button");
  const results = document.getElementById("results");
  const SOURCES = {usage: "counted from usage", chunks: "counted as content events",
    mixed: "from usage where reported, else content events", none: "not counted"};
  let shownState = null;
  let poller = null;
  let deleted = false;

  // --- figures as tables -------------------------------------------------------------------------------

  function rowsTable(id, caption, rows) {
    return el("table", {class: "table table-sm small mb-0", id},
      el("caption", {class: "visually-hidden"}, caption),
      el("tbody", {}, ...rows.map(([name, value, key]) => el("tr", {"data-figure": key},
        el("th", {scope: "row", class: "fw-normal text-body-secondary"}, name), el("td", {}, value)))));
  }

  function figuresTable(figures) {
    const examples = figures.error_examples || {};
    const errors = Object.entries(figures.errors || {}).sort().map(([kind, count]) => el("li", {}, `${kind}: ${count}`,
      examples[kind] ? el("span", {class: "text-body-secondary"}, ` (${examples[kind]})`) : null));
    return rowsTable("figures-table", "What was measured", [
      ["Clients", `${figures.clients} (${figures.max_in_flight} in flight at most)`, "clients"],
      ["Requests", `${figures.completed} done, ${figures.failed} failed`, "requests"],
      ["Wall time", F.seconds(figures.wall_seconds, {name: "s", factor: 1}), "wall"],
      ["Requests/s", F.rate(figures.requests_per_second, 2), "requests_per_second"],
      ["Output tokens/s", `${F.rate(figures.output_tokens_per_second)} (${figures.output_tokens} tokens, ` +
        `${SOURCES[figures.token_source] || figures.token_source})`, "tokens_per_second"],
      ["Errors", errors.length ? el("ul", {class: "list-unstyled mb-0"}, ...errors) : "none", "errors"],
      ["Client CPU time", F.seconds(figures.client_cpu_seconds, {name: "s", factor: 1}), "client_cpu"],
    ]);
  }

  function distributionsTable(figures) {
    const columns = ["count", "mean", "p50", "p90", "p95", "p99", "max"];
    const rows = [["Time to first token", figures.ttft_seconds, "ttft"],
      ["Inter-token latency", figures.itl_seconds, "itl"], ["End-to-end latency", figures.latency_seconds, "latency"]];
    return el("table", {class: "table table-sm small", id: "distributions-table"},
      el("caption", {}, "Durations over the requests that succeeded (percentiles are nearest-rank)"),
      el("thead", {}, el("tr", {}, el("th", {scope: "col"}, "Duration"),
        ...columns.map((column) => el("th", {scope: "col", class: "text-end"}, column)))),
      el("tbody", {}, ...rows.map(([name, dist, key]) => el("tr", {"data-distribution": key},
        el("th", {scope: "row", class: "fw-normal"}, name),
        ...columns.map((column) => el("td", {class: "text-end", "data-column": column},
          !dist || !dist.count ? (column === "count" ? "0" : "—") :
            column === "count" ? String(dist.count) : F.seconds(dist[column])))))));
  }

  // --- the latency distribution --------------------------------------------------------------------------

  function histogramFigure(id, quantity, values, what) {
    const binned = F.bins(values);
    const captionText = `${quantity} of the ${F.plural(values.length, "request")} that succeeded`;
    const unit = F.timeUnit(binned.length ? binned[binned.length - 1].to : 0);
    const table = el("table", {class: "table table-sm small mb-0", id: `${id}-bins`},
      el("caption", {}, `${quantity}: requests per bin`),
      el("thead", {}, el("tr", {}, el("th", {scope: "col"}, `From (${unit.name})`),
        el("th", {scope: "col"}, `To (${unit.name})`), el("th", {scope: "col", class: "text-end"}, "Requests"))),
      el("tbody", {}, ...binned.map((bin) => el("tr", {},
        el("td", {}, F.significant(bin.from * unit.factor)), el("td", {}, F.significant(bin.to * unit.factor)),
        el("td", {class: "text-end"}, String(bin.count))))));
    return el("figure", {class: "col-lg-6 mb-0", id},
      values.length ? F.histogram(binned, {title: captionText, quantity: what}) :
        el("p", {class: "text-body-secondary"}, "No request succeeded: nothing to plot."),
      el("figcaption", {class: "small text-body-secondary"}, captionText),
      el("details", {class: "small mt-1"}, el("summary", {}, "The bins as a table"), table));
  }

  function distributionSection(figures, heading) {
    const perRequest = figures.per_request || {};
    const ok = (perRequest.error || []).map((error) => error === null);
    const pick = (name) => (perRequest[name] || [])
      .filter((value, index) => ok[index] && value !== null && value !== undefined);
    const section = el("section", {class: "mt-4", "aria-labelledby": "distribution-title"},
      el("h2", {class: "h5", id: "distribution-title"}, heading),
      el("div", {class: "row g-4"},
        histogramFigure("ttft-histogram", "Time to first token", pick("ttft"), "time to first token"),
        histogramFigure("latency-histogram", "End-to-end latency", pick("latency"), "end-to-end latency")));
    return section;
  }

  function loadResults(figures, heading) {
    return [
      el("section", {class: "mt-4", "aria-labelledby": "figures-title"},
        el("h2", {class: "h5", id: "figures-title"}, heading),
        el("div", {class: "row g-4"}, el("div", {class: "col-lg-5"}, figuresTable(figures)),
          el("div", {class: "col-lg-7"}, distributionsTable(figures)))),
      distributionSection(figures, "Latency distribution"),
    ];
  }

  // --- a sweep ----------------------------------------------------------------------------------------

  function sweepResults(result) {
    const points = result.points || [];
    const clients = points.map((point) => point.clients);
    const target = result.ttft_target_seconds;
    const best = result.best_clients;
    const percentile = result.ttft_percentile;
    const goal = `TTFT p${percentile} at most ${F.seconds(target)} with no failed request`;
    const verdict = best ? el("p", {class: "alert alert-success", id: "sweep-verdict"},
      el("strong", {}, F.plural(best, "client")), ` is the highest load that met the target (${goal}).`) :
      el("p", {class: "alert alert-warning", id: "sweep-verdict"}, `No load met the target (${goal}).`);
    const throughput = F.lineChart({title: "Output tokens per second against clients", xValues: clients,
      yLabel: "output tokens/s", series: [{name: "output tokens/s", className: "series-a",
        values: points.map((point) => point.output_tokens_per_second)}], marked: best});
    const ttft = F.lineChart({title: `Time to first token against clients, with the target`, xValues: clients,
      yLabel: "time to first token", seconds: true, target, marked: best, series: [
        {name: "TTFT p50", className: "series-a", values: points.map((point) => point.ttft_seconds.p50)},
        {name: `TTFT p${percentile}`, className: "series-b",
          values: points.map((point) => point.ttft_seconds[`p${percentile}`])},
      ]});
    const table = el("table", {class: "table table-sm small", id: "sweep-table"},
      el("caption", {}, "Each client count's figures (the numbers of the plots above)"),
      el("thead", {}, el("tr", {}, ...["Clients", "In flight at most", "Requests/s", "Output tokens/s", "TTFT p50",
        `TTFT p${percentile}`, "Failed", "Meets the target"].map((name) => el("th", {scope: "col"}, name)))),
      el("tbody", {}, ...points.map((point) => el("tr", {"data-clients": point.clients,
        class: point.clients === best ? "table-success" : null},
      el("th", {scope: "row"}, String(point.clients)), el("td", {}, String(point.max_in_flight)),
      el("td", {}, F.rate(point.requests_per_second, 2)), el("td", {}, F.rate(point.output_tokens_per_second)),
      el("td", {}, F.seconds(point.ttft_seconds.p50)), el("td", {}, F.seconds(point.ttft_seconds[`p${percentile}`])),
      el("td", {}, String(point.failed)),
      el("td", {}, point.meets_target ? "yes" : "no", point.clients === best ? " (highest)" : "")))));
    const choice = el("select", {class: "form-select form-select-sm w-auto", id: "point-select"},
      ...points.map((point) => el("option", {value: point.clients}, F.plural(point.clients, "client"))));
    const shown = el("div", {id: "point-results"});
    const showPoint = () => {
      const point = points.find((item) => String(item.clients) === choice.value);
      shown.replaceChildren(...loadResults(point, `Figures at ${F.plural(point.clients, "client")}`));
    };
    choice.value = String(best || (points.length ? points[points.length - 1].clients : ""));
    choice.addEventListener("change", showPoint);
    const parts = [
      el("section", {class: "mt-4", "aria-labelledby": "sweep-title"},
        el("h2", {class: "h5", id: "sweep-title"}, "Throughput and time to first token against clients"),
        verdict,
        el("div", {class: "row g-4"},
          el("figure", {class: "col-lg-6 mb-0", id: "throughput-plot"}, throughput,
            el("figcaption", {class: "small text-body-secondary"}, "Output tokens per second at each client count")),
          el("figure", {class: "col-lg-6 mb-0", id: "ttft-plot"}, ttft,
            el("figcaption", {class: "small text-body-secondary"},
              `TTFT p50 and p${percentile} at each client count; the dashed line is the target`))),
        el("div", {class: "table-responsive mt-3"}, table)),
    ];
    if (points.length) {
      parts.push(el("div", {class: "d-flex align-items-center gap-2 mt-4"},
        el("label", {for: "point-select", class: "form-label mb-0"}, "Details at"), choice), shown);
      showPoint();
    }
    return parts;
  }

  // --- the page ---------------------------------------------------------------------------------------

  function renderProgress() {
    const section = document.getElementById("progress-section");
    section.hidden = run.state !== "RUNNING";
    if (run.state !== "RUNNING") return;
    const progress = run.progress || {};
    const percent = progress.total ? Math.round(100 * progress.done / progress.total) : 0;
    const bar = document.getElementById("progress-bar");
    bar.setAttribute("aria-valuenow", String(percent));
    bar.firstElementChild.style.width = `${percent}%`;
    PF.setText(document.getElementById("progress-text"), progress.total ?
      `${progress.done} of ${progress.total} requests done (${percent} %)` : "Starting…");
  }

  function render() {
    if (shownState !== run.state) {
      document.getElementById("state-badge").replaceChildren(F.badge(run.state));
      cancelButton.hidden = run.state !== "RUNNING";
      deleteButton.hidden = run.state === "RUNNING";
      if (run.state === "FAILED" || run.state === "CANCELLED") {
        const failed = run.state === "FAILED";
        PF.alert(notices, failed ? "danger" : "secondary",
          failed ? `The benchmark failed: ${run.error || "no reason given"}` : "The benchmark was cancelled.");
      }
      if (run.state === "DONE" && run.result) {
        results.replaceChildren(...(run.result.mode === "sweep" ? sweepResults(run.result) :
          loadResults(run.result, "Figures")));
      }
      shownState = run.state;
    }
    renderProgress();
  }

  async function refresh() {
    if (deleted) return;
    run = await PF.api("GET", `/api/benchmarks/${run.id}`);
    render();
    if (run.state !== "RUNNING") poller.stop();
  }

  cancelButton.addEventListener("click", async () => {
    const ok = await PF.confirm(`Cancel benchmark ${run.id}?`,
      "This stops the load now; what it measured so far is not kept.", "Cancel benchmark");
    if (!ok) return;
    try {
      await PF.api("DELETE", `/api/benchmarks/${run.id}`);
    } catch (err) {
      PF.alert(notices, "danger", `Could not cancel: ${err.message}`);
    }
    poller.now();
  });
  deleteButton.addEventListener("click", async () => {
    const ok = await PF.confirm(`Delete benchmark ${run.id}?`, "This forgets the run and its figures.",
      "Delete benchmark");
    if (!ok) return;
    try {
      await PF.api("DELETE", `/api/benchmarks/${run.id}`);
      deleted = true;
      window.location.assign(PF.url("/ui/benchmarks"));
    } catch (err) {
      PF.alert(notices, "danger", `Could not delete: ${err.message}`);
    }
  });

  const started = document.getElementById("started-at");
  started.textContent = PF.when(run.created_at);
  render();
  poller = PF.poll(refresh, 1000, document.getElementById("refresh-status"), false);
  if (run.state !== "RUNNING") poller.stop();
})();
