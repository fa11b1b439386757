// The job page's line charts: uPlot (vendored, loaded by index.html as the global `uPlot`).

import {h} from "./dom.js";
import {fmtNum, fmtTick} from "./format.js";

export const COLORS = {train: "#1f6feb", valid: "#d9480f", lr: "#2b8a3e"};

// A uPlot line chart in `wrap`, sized to it; `data-points` on the wrapper counts the points of its first series.
export function lineChart(current, wrap, {title, yLabel, series}) {
  const opts = {
    title,
    width: Math.max(200, wrap.clientWidth),
    height: 220,
    scales: {x: {time: false}},
    series: [{label: "step"}, ...series.map((s) => ({label: s.label, stroke: s.color, width: 2, spanGaps: true, points: {show: true, size: 5}}))],
    axes: [{label: "step", incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000]}, {label: yLabel, size: 64, values: (u, ticks) => ticks.map(fmtTick)}],
  };
  const chart = new uPlot(opts, [[], ...series.map(() => [])], wrap);
  const observer = new ResizeObserver(() => chart.setSize({width: Math.max(200, wrap.clientWidth), height: 220}));
  observer.observe(wrap);
  current.cleanups.push(() => { observer.disconnect(); chart.destroy(); });
  return (data) => {
    chart.setData(data);
    const n = data[1].filter((v) => v !== null && v !== undefined).length;
    wrap.dataset.points = String(n);
    const last = [...data[1]].reverse().find((v) => v !== null && v !== undefined);
    wrap.setAttribute("aria-label", `${title}: ${n} points${last !== undefined ? `, latest ${fmtNum(last)}` : ""}`);
  };
}

export function chartBox(name, title) {
  return h("figure", {class: "chart", dataset: {chart: name, points: "0"}, role: "img", "aria-label": `${title}: no points yet`});
}
