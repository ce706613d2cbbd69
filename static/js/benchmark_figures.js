"use strict";
// Benchmark figures for people: seconds and rates as text, the shortest useful summary of a run, and the plots
// (inline SVG built here: histograms, and line charts against the client count) with labelled axes.

const BenchmarkFigures = (() => {
  const SVG = "http://www.w3.org/2000/svg";
  const STATES = {
    RUNNING: "text-bg-primary", DONE: "text-bg-success", FAILED: "text-bg-danger", CANCELLED: "text-bg-secondary",
  };
  let plotCount = 0;

  // --- numbers as text -------------------------------------------------------------------------------

  function significant(value, digits = 3) {
    if (value === 0) return "0";
    const rounded = Number(value.toPrecision(digits));
    return Math.abs(rounded) >= 10 ** digits ? String(Math.round(rounded)) : String(rounded);
  }

  // The unit that suits seconds up to `largest`: milliseconds below one second.
  function timeUnit(largest) {
    return largest < 1 ? {name: "ms", factor: 1000} : {name: "s", factor: 1};
  }

  function seconds(value, unit) {
    if (value === null || value === undefined) return "—";
    const chosen = unit || timeUnit(value);
    return `${significant(value * chosen.factor)} ${chosen.name}`;
  }

  // "1 client", "4 clients"
  function plural(count, word) {
    return `${count} ${word}${count === 1 ? "" : "s"}`;
  }

  function rate(value, digits = 1) {
    return value === null || value === undefined ? "—" : Number(value).toFixed(digits);
  }

  function badge(state) {
    return PF.el("span", {class: `badge ${STATES[state] || "text-bg-secondary"}`, "data-state": state}, state);
  }

  // The figures a run is compared by: a load's own, or for a sweep the best point's (else its last).
  function headline(run) {
    const summary = run.summary;
    if (!summary) return null;
    if (summary.mode !== "sweep") return {figures: summary, point: null};
    const points = summary.points || [];
    const point = points.find((item) => item.clients === summary.best_clients) || points[points.length - 1] || null;
    return point ? {figures: point, point} : null;
  }

  // --- plots -----------------------------------------------------------------------------------------

  function svgEl(tag, attributes, ...children) {
    const node = document.createElementNS(SVG, tag);
    for (const [key, value] of Object.entries(attributes || {})) {
      if (value !== null && value !== undefined) node.setAttribute(key, value);
    }
    for (const child of children) node.append(child instanceof Node ? child : String(child));
    return node;
  }

  function niceStep(raw) {
    const power = 10 ** Math.floor(Math.log10(raw));
    const fraction = raw / power;
    return (fraction <= 1 ? 1 : fraction <= 2 ? 2 : fraction <= 2.5 ? 2.5 : fraction <= 5 ? 5 : 10) * power;
  }

  // Bins of equal, round width covering the values: [{from, to, count}], the last one closed on the right.
  function bins(values, most = 20) {
    if (!values.length) return [];
    const low = Math.min(...values);
    const high = Math.max(...values);
    let step;
    let start;
    let count;
    if (high === low) {
      step = niceStep(Math.max(Math.abs(low) * 0.1, 1e-4));
      start = Math.floor(low / step) * step;
      count = 1;
    } else {
      step = niceStep((high - low) / Math.min(most, Math.max(4, Math.ceil(Math.sqrt(values.length)))));
      start = Math.floor(low / step) * step;
      count = Math.floor((high - start) / step + 1e-9) + 1;
    }
    const result = Array.from({length: count}, (_, index) => ({
      from: start + index * step, to: start + (index + 1) * step, count: 0,
    }));
    for (const value of values) {
      const index = Math.min(count - 1, Math.max(0, Math.floor((value - start) / step + 1e-9)));
      result[index].count += 1;
    }
    return result;
  }

  // Up to `most` round values from 0 to at least `high`.
  function ticks(high, most = 5, whole = false) {
    if (!(high > 0)) return [0, 1];
    let step = niceStep(high / most);
    if (whole) step = Math.max(1, Math.ceil(step));
    const result = [];
    for (let value = 0; value < high + step * 0.999; value += step) result.push(Number(value.toPrecision(12)));
    return result;
  }

  const WIDTH = 520;
  const HEIGHT = 280;
  const MARGIN = {left: 64, right: 20, top: 34, bottom: 52};

  // The frame of a plot: the svg, its title, axes lines, labels; `x`/`y` map data to the drawing.
  function frame(title, xLabel, yLabel) {
    plotCount += 1;
    const titleId = `plot-title-${plotCount}`;
    const svg = svgEl("svg", {viewBox: `0 0 ${WIDTH} ${HEIGHT}`, role: "img", "aria-labelledby": titleId,
      class: "bench-plot", preserveAspectRatio: "xMidYMid meet"});
    svg.append(svgEl("title", {id: titleId}, title));
    const left = MARGIN.left;
    const right = WIDTH - MARGIN.right;
    const top = MARGIN.top;
    const bottom = HEIGHT - MARGIN.bottom;
    svg.append(svgEl("line", {class: "axis", x1: left, y1: bottom, x2: right, y2: bottom}),
      svgEl("line", {class: "axis", x1: left, y1: top, x2: left, y2: bottom}),
      svgEl("text", {class: "axis-label", "data-axis": "x", x: (left + right) / 2, y: HEIGHT - 8,
        "text-anchor": "middle"}, xLabel),
      svgEl("text", {class: "axis-label", "data-axis": "y", x: -(top + bottom) / 2, y: 16, "text-anchor": "middle",
        transform: "rotate(-90)"}, yLabel));
    return {svg, left, right, top, bottom};
  }

  function xTick(plot, x, label) {
    plot.svg.append(svgEl("line", {class: "tick", x1: x, y1: plot.bottom, x2: x, y2: plot.bottom + 5}),
      svgEl("text", {class: "tick-label", x, y: plot.bottom + 18, "text-anchor": "middle"}, label));
  }

  function yTick(plot, y, label) {
    plot.svg.append(svgEl("line", {class: "grid", x1: plot.left, y1: y, x2: plot.right, y2: y}),
      svgEl("text", {class: "tick-label", x: plot.left - 8, y: y + 4, "text-anchor": "end"}, label));
  }

  // A histogram of durations in seconds: one bar (rect.bar, with data-count) per bin of `binned`.
  function histogram(binned, {title, quantity}) {
    const high = binned.length ? binned[binned.length - 1].to : 1;
    const unit = timeUnit(high);
    const plot = frame(title, `${quantity} (${unit.name})`, "requests");
    const low = binned.length ? binned[0].from : 0;
    const x = (value) => plot.left + (value - low) / ((high - low) || 1) * (plot.right - plot.left);
    const most = Math.max(1, ...binned.map((bin) => bin.count));
    const yValues = ticks(most, 5, true);
    const top = yValues[yValues.length - 1];
    const y = (count) => plot.bottom - count / top * (plot.bottom - plot.top);
    for (const value of yValues) yTick(plot, y(value), String(value));
    const every = Math.ceil((binned.length + 1) / 8);
    binned.forEach((bin, index) => {
      const from = x(bin.from);
      const width = Math.max(1, x(bin.to) - from - 2);
      plot.svg.append(svgEl("rect", {class: "bar", x: from + 1, y: y(bin.count), width,
        height: plot.bottom - y(bin.count), "data-count": bin.count, "data-from": bin.from, "data-to": bin.to},
      svgEl("title", {}, `${seconds(bin.from, unit)} to ${seconds(bin.to, unit)}: ${plural(bin.count, "request")}`)));
      if (index % every === 0) xTick(plot, from, significant(bin.from * unit.factor));
    });
    if (binned.length && binned.length % every === 0) xTick(plot, x(high), significant(high * unit.factor));
    return plot.svg;
  }

  // A line chart against the client count: `series` [{name, className, values: [y per point]}] (durations in seconds
  // when `seconds` is set); `target` draws a dashed level, `marked` rings the points at that client count.
  function lineChart({title, xValues, series, yLabel, seconds: durations, target, marked}) {
    const allY = series.flatMap((line) => line.values.filter((value) => value !== null && value !== undefined));
    if (target !== undefined && target !== null) allY.push(target);
    const highY = Math.max(0, ...allY);
    const unit = durations ? timeUnit(highY) : {name: "", factor: 1};
    const plot = frame(title, "clients" + (useLog(xValues) ? " (log scale)" : ""),
      durations ? `${yLabel} (${unit.name})` : yLabel);
    const yValues = ticks(highY * unit.factor, 5);
    const topY = yValues[yValues.length - 1] / unit.factor || 1;
    const y = (value) => plot.bottom - value / topY * (plot.bottom - plot.top);
    for (const value of yValues) yTick(plot, y(value / unit.factor), significant(value));
    const x = xScale(xValues, plot);
    for (const value of xValues) xTick(plot, x(value), String(value));
    if (target !== undefined && target !== null) {
      const level = y(target);
      plot.svg.append(svgEl("line", {class: "target", x1: plot.left, y1: level, x2: plot.right, y2: level}),
        svgEl("text", {class: "target-label", x: plot.right, y: level - plot.top < 20 ? level + 14 : level - 5,
          "text-anchor": "end"}, `target ${seconds(target, unit)}`));
    }
    if (marked !== undefined && marked !== null) {  // a dashed upright at the best load, labelled above the plot
      const at = x(marked);
      const share = (at - plot.left) / (plot.right - plot.left);
      const anchor = share > 0.75 ? "end" : share < 0.25 ? "start" : "middle";
      plot.svg.append(svgEl("line", {class: "marked", x1: at, y1: plot.top, x2: at, y2: plot.bottom}),
        svgEl("text", {class: "marked-label", x: at, y: plot.top - 10, "text-anchor": anchor},
          `highest meeting the target: ${plural(marked, "client")}`));
    }
    series.forEach((line, index) => {
      const points = xValues.map((value, at) => [value, line.values[at]])
        .filter(([, value]) => value !== null && value !== undefined);
      if (points.length > 1) {
        plot.svg.append(svgEl("polyline", {class: `line ${line.className}`, fill: "none",
          points: points.map(([value, measured]) => `${x(value)},${y(measured)}`).join(" ")}));
      }
      for (const [value, measured] of points) {
        const text = durations ? seconds(measured, unit) : significant(measured);
        plot.svg.append(svgEl("circle", {class: `point ${line.className}`, cx: x(value), cy: y(measured), r: 4,
          "data-series": line.name, "data-x": value, "data-y": measured},
        svgEl("title", {}, `${line.name} at ${plural(value, "client")}: ${text}`)));
        if (value === marked) {
          plot.svg.append(svgEl("circle", {class: "best", cx: x(value), cy: y(measured), r: 8,
            "data-series": line.name}));
        }
      }
      if (series.length > 1) {  // the legend, top left
        const legendY = plot.top + 8 + index * 16;
        plot.svg.append(svgEl("line", {class: `line ${line.className}`, x1: plot.left + 10, y1: legendY,
          x2: plot.left + 30, y2: legendY}),
        svgEl("text", {class: "legend", x: plot.left + 36, y: legendY + 4}, line.name));
      }
    });
    return plot.svg;
  }

  function useLog(xValues) {
    const low = Math.min(...xValues);
    return low > 0 && Math.max(...xValues) / low >= 8;
  }

  function xScale(xValues, plot) {
    const inset = 24;
    const from = plot.left + inset;
    const to = plot.right - inset;
    const log = useLog(xValues);
    const map = log ? Math.log2 : (value) => value;
    const low = map(Math.min(...xValues));
    const high = map(Math.max(...xValues));
    return (value) => (high === low ? (from + to) / 2 : from + (map(value) - low) / (high - low) * (to - from));
  }

  return {seconds, timeUnit, plural, rate, significant, badge, headline, bins, histogram, lineChart};
})();
