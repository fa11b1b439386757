// The QLoRA dashboard: a small hash-routed page over the public REST API (docs/dashboard.md).
// Every call carries the signed-in key as "Authorization: Bearer KEY"; the key lives in sessionStorage only.
"use strict";

const KEY_STORAGE = "qlora.apiKey";
const POLL_MS = 1000; // how often a job page asks for new metrics while the job is queued or running
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const STATUSES = ["queued", "running", "succeeded", "failed", "cancelled"];
const PAGE_SIZE = 20;

// --- small helpers ---------------------------------------------------------------------------------------------

// h("a", {href: "#/jobs"}, "Jobs"): an element with attributes and children (text nodes, never HTML).
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(el.dataset, value);
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

function fmtTime(unix) {
  return unix ? new Date(unix * 1000).toLocaleString() : "—";
}

function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined || seconds < 0) return "—";
  const s = Math.round(seconds);
  const parts = [Math.floor(s / 3600), Math.floor((s % 3600) / 60), s % 60];
  return parts[0] ? `${parts[0]}h ${parts[1]}m ${parts[2]}s` : parts[1] ? `${parts[1]}m ${parts[2]}s` : `${parts[2]}s`;
}

function jobDuration(job) {
  if (job.finished_at) return fmtDuration(job.finished_at - job.created_at);
  if (TERMINAL.has(job.status)) return "—";
  return `${fmtDuration(Date.now() / 1000 - job.created_at)} so far`;
}

function fmtBytes(n) {
  if (n === null || n === undefined) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${i ? n.toFixed(2) : n} ${units[i]}`;
}

function fmtNum(x, digits = 4) {
  if (x === null || x === undefined || Number.isNaN(x)) return "—";
  if (Number.isInteger(x)) return x.toLocaleString();
  return Math.abs(x) < 1e-3 ? x.toExponential(2) : x.toPrecision(digits);
}

// An axis tick: three significant digits, exponent notation for small values (learning rates).
function fmtTick(v) {
  if (v === 0) return "0";
  return Math.abs(v) < 0.01 ? v.toExponential(1) : String(Number(v.toPrecision(3)));
}

function fmtPercent(x) {
  return x === null || x === undefined ? "—" : `${(100 * x).toFixed(1)} %`;
}

function statusBadge(status) {
  return h("span", {class: `badge status-${status}`}, status);
}

// The query string of a hash route (#/jobs?status=running) as URLSearchParams.
function routeParams() {
  const hash = location.hash;
  const q = hash.indexOf("?");
  return new URLSearchParams(q >= 0 ? hash.slice(q + 1) : "");
}

// --- the API ---------------------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, envelope) {
    const err = (envelope && envelope.error) || {};
    super(err.message || `HTTP ${status}`);
    this.status = status;
    this.code = err.code || null;
    this.param = err.param || null;
    this.type = err.type || null;
  }
}

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE);
}

// fetch with the key; an answer other than 2xx becomes an ApiError carrying the envelope's message, code and param.
async function api(path, {method = "GET", json, form, raw = false, key} = {}) {
  const headers = {Authorization: `Bearer ${key || apiKey() || ""}`};
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (form) {
    body = form;
  }
  let res;
  try {
    res = await fetch(path, {method, headers, body});
  } catch (exc) {
    throw new ApiError(0, {error: {message: `The service could not be reached (${exc.message}).`, code: "network_error"}});
  }
  if (!res.ok) {
    let envelope = null;
    try { envelope = await res.json(); } catch { /* not JSON: the status line says enough */ }
    if (!envelope || !envelope.error) envelope = {error: {message: `HTTP ${res.status} ${res.statusText}`}};
    throw new ApiError(res.status, envelope);
  }
  return raw ? res : res.json();
}

// Every page of a list (`after` = the last id), up to `max` items.
async function listAll(path, max = 1000, pageSize = 100) {
  const items = [];
  let after = null;
  for (;;) {
    const sep = path.includes("?") ? "&" : "?";
    const page = await api(`${path}${sep}limit=${pageSize}${after ? `&after=${encodeURIComponent(after)}` : ""}`);
    items.push(...page.data);
    if (!page.has_more || !page.data.length || items.length >= max) return items;
    after = page.data[page.data.length - 1].id;
  }
}

// A download needs the Authorization header, so it is fetched and handed to the browser as a blob.
async function download(path, filename) {
  const res = await api(path, {raw: true});
  const blob = await res.blob();
  const url = URL.createObjectURL(blob);
  const link = h("a", {href: url, download: filename, hidden: true});
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60000);
}

// An API error as a person reads it: the message, then the code and the parameter it names.
function errorBox(err) {
  const box = h("div", {class: "error", role: "alert"});
  if (!(err instanceof ApiError)) {
    box.append(h("p", {}, String(err && err.message ? err.message : err)));
    return box;
  }
  box.append(h("p", {class: "error-message"}, err.message));
  const facts = h("dl", {class: "error-facts"});
  if (err.status) facts.append(h("dt", {}, "HTTP status"), h("dd", {}, String(err.status)));
  if (err.code) facts.append(h("dt", {}, "code"), h("dd", {}, h("code", {}, err.code)));
  if (err.param) facts.append(h("dt", {}, "param"), h("dd", {}, h("code", {}, err.param)));
  box.append(facts);
  if (err.status === 401) box.append(h("p", {}, h("a", {href: "#/signin"}, "Sign in again")));
  return box;
}

// Runs an action from a button: the button is disabled meanwhile and an error lands in `errors` (an element).
async function act(button, errors, fn) {
  errors.replaceChildren();
  button.disabled = true;
  try {
    await fn();
  } catch (err) {
    errors.replaceChildren(errorBox(err));
  } finally {
    button.disabled = false;
  }
}

// --- routing ---------------------------------------------------------------------------------------------------

const main = document.getElementById("main");
let view = {alive: false, cleanups: []}; // the current page: its timers and charts are dropped when the route changes

function leaveView() {
  view.alive = false;
  for (const fn of view.cleanups) fn();
  view = {alive: true, cleanups: []};
  return view;
}

const routes = [
  [/^#\/signin$/, signInPage],
  [/^#\/jobs\/([^/?]+)$/, jobPage],
  [/^#\/jobs$/, jobsPage],
  [/^#\/upload$/, uploadPage],
  [/^#\/new$/, newJobPage],
  [/^#\/chat$/, chatPage],
];

async function route() {
  const current = leaveView();
  const hash = location.hash || "#/jobs";
  const path = hash.split("?")[0];
  document.getElementById("nav").hidden = !apiKey();
  if (!apiKey() && path !== "#/signin") {
    sessionStorage.setItem("qlora.next", hash);
    location.replace("#/signin");
    return;
  }
  for (const link of document.querySelectorAll("#nav a")) {
    if (link.getAttribute("href") === path) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  const found = routes.find(([pattern]) => pattern.test(path));
  main.replaceChildren();
  if (!found) {
    main.append(h("h1", {}, "Not found"), h("p", {}, h("a", {href: "#/jobs"}, "Back to the jobs")));
    return;
  }
  const [pattern, page] = found;
  const args = path.match(pattern).slice(1).map(decodeURIComponent);
  try {
    await page(current, ...args);
  } catch (err) {
    if (current.alive) main.append(errorBox(err));
  }
}

function setTitle(text) {
  document.title = `${text} · QLoRA dashboard`;
}

// --- sign in ---------------------------------------------------------------------------------------------------

async function signInPage() {
  setTitle("Sign in");
  const errors = h("div", {});
  const input = h("input", {id: "api-key", name: "api-key", type: "password", autocomplete: "off", required: true,
                            "aria-describedby": "api-key-help", spellcheck: "false"});
  const button = h("button", {type: "submit", id: "sign-in"}, "Sign in");
  const form = h("form", {class: "card narrow", id: "sign-in-form"},
    h("h1", {}, "Sign in"),
    h("label", {for: "api-key"}, "API key"),
    input,
    h("p", {id: "api-key-help", class: "help"},
      "A key from QLORA_API_KEYS, or the one `make run` printed ($QLORA_HOME/api_key). It is kept in this browser tab ",
      "only (sessionStorage) and sent as the Authorization header of each request."),
    button,
    errors);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    act(button, errors, async () => {
      const key = input.value.trim();
      await api("/v1/models", {key}); // a key the API refuses is answered here with its 401 envelope
      sessionStorage.setItem(KEY_STORAGE, key);
      const next = sessionStorage.getItem("qlora.next");
      sessionStorage.removeItem("qlora.next");
      location.hash = next && next !== "#/signin" ? next : "#/jobs";
    });
  });
  main.append(form);
}

function signOut() {
  sessionStorage.removeItem(KEY_STORAGE);
  sessionStorage.removeItem("qlora.next");
  if (location.hash === "#/signin") route();
  else location.hash = "#/signin"; // the hashchange renders the page
}

// --- jobs list -------------------------------------------------------------------------------------------------

async function jobsPage(current) {
  setTitle("Jobs");
  const params = routeParams();
  const status = params.get("status") || "";
  // The cursors of the pages before this one (each an `after` id), so "Previous page" can go back.
  const cursors = (params.get("cursors") || "").split(",").filter(Boolean);
  const hashFor = (s, c) => {
    const q = new URLSearchParams();
    if (s) q.set("status", s);
    if (c.length) q.set("cursors", c.join(","));
    const text = q.toString();
    return `#/jobs${text ? `?${text}` : ""}`;
  };

  const select = h("select", {id: "status-filter", name: "status"},
    h("option", {value: ""}, "All"),
    STATUSES.map((s) => h("option", {value: s, selected: s === status}, s)));
  select.addEventListener("change", () => { location.hash = hashFor(select.value, []); });
  main.append(
    h("div", {class: "title-row"}, h("h1", {}, "Fine-tuning jobs"), h("a", {class: "button", href: "#/new"}, "New job")),
    h("div", {class: "filters"}, h("label", {for: "status-filter"}, "Status"), select));

  const query = new URLSearchParams({limit: String(PAGE_SIZE)});
  if (status) query.set("status", status);
  if (cursors.length) query.set("after", cursors[cursors.length - 1]);
  const page = await api(`/v1/fine_tuning/jobs?${query}`);
  if (!current.alive) return;
  if (!page.data.length) {
    main.append(h("p", {id: "no-jobs", class: "empty"}, status ? `No ${status} jobs.` : "No jobs yet."));
  } else {
    const rows = page.data.map((job) => h("tr", {dataset: {job: job.id}},
      h("td", {}, h("a", {href: `#/jobs/${encodeURIComponent(job.id)}`}, job.id)),
      h("td", {}, statusBadge(job.status)),
      h("td", {}, job.model),
      h("td", {}, fmtTime(job.created_at)),
      h("td", {}, jobDuration(job)),
      h("td", {class: "num"}, fmtNum(job.trained_tokens))));
    main.append(h("div", {class: "table-wrap"}, h("table", {id: "jobs-table"},
      h("caption", {class: "sr-only"}, "Fine-tuning jobs, newest first"),
      h("thead", {}, h("tr", {}, ["Job", "Status", "Model", "Created", "Duration", "Trained tokens"].map((t) => h("th", {scope: "col"}, t)))),
      h("tbody", {}, rows))));
  }
  const pager = h("nav", {class: "pager", "aria-label": "Pages"});
  if (cursors.length) pager.append(h("a", {class: "button", href: hashFor(status, cursors.slice(0, -1)), id: "prev-page"}, "Previous page"));
  if (page.has_more) {
    pager.append(h("a", {class: "button", href: hashFor(status, [...cursors, page.data[page.data.length - 1].id]), id: "next-page"}, "Next page"));
  }
  main.append(pager);
}

// --- one job ---------------------------------------------------------------------------------------------------

const COLORS = {train: "#1f6feb", valid: "#d9480f", lr: "#2b8a3e"};

// A uPlot line chart in `wrap`, sized to it; `data-points` on the wrapper counts the points of its first series.
function lineChart(current, wrap, {title, yLabel, series}) {
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

function chartBox(name, title) {
  return h("figure", {class: "chart", dataset: {chart: name, points: "0"}, role: "img", "aria-label": `${title}: no points yet`});
}

async function jobPage(current, jobId) {
  setTitle(jobId);
  const base = `/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}`;
  const errors = h("div", {id: "job-errors"});
  const header = h("div", {class: "title-row"});
  const summary = h("dl", {class: "facts", id: "job-summary"});
  const stats = h("div", {class: "stats", id: "job-stats"});
  const lossBox = chartBox("loss", "Loss");
  const accBox = chartBox("accuracy", "Token accuracy");
  const lrBox = chartBox("learning-rate", "Learning rate");
  const checkpoints = h("div", {id: "checkpoints"});
  const results = h("div", {id: "result-files"});
  const events = h("div", {id: "events"});
  const hyper = h("div", {id: "hyperparameters"});
  main.append(header, errors,
    h("section", {"aria-labelledby": "h-summary"}, h("h2", {id: "h-summary"}, "Summary"), summary, stats),
    h("section", {"aria-labelledby": "h-curves", class: "charts"}, h("h2", {id: "h-curves"}, "Curves"), lossBox, accBox, lrBox),
    h("section", {"aria-labelledby": "h-checkpoints"}, h("h2", {id: "h-checkpoints"}, "Checkpoints"), checkpoints),
    h("section", {"aria-labelledby": "h-results"}, h("h2", {id: "h-results"}, "Result files"), results),
    h("section", {"aria-labelledby": "h-events"}, h("h2", {id: "h-events"}, "Events"), events),
    h("section", {"aria-labelledby": "h-hyper"}, h("h2", {id: "h-hyper"}, "Hyperparameters"), hyper));

  const drawLoss = lineChart(current, lossBox, {title: "Loss", yLabel: "loss",
    series: [{label: "train loss", color: COLORS.train}, {label: "validation loss", color: COLORS.valid}]});
  const drawAcc = lineChart(current, accBox, {title: "Token accuracy", yLabel: "accuracy",
    series: [{label: "train accuracy", color: COLORS.train}, {label: "validation accuracy", color: COLORS.valid}]});
  const drawLr = lineChart(current, lrBox, {title: "Learning rate", yLabel: "learning rate",
    series: [{label: "learning rate", color: COLORS.lr}]});

  const metrics = []; // every step so far, ascending; new ones are fetched with `after` = the last step
  let estimate; // the job's memory estimate event's data (undefined: not looked up yet, null: none)
  const fileInfo = new Map(); // result file id -> FileObject
  let cancelArmed = false;
  let timer = null;
  current.cleanups.push(() => clearTimeout(timer));

  async function fetchNewMetrics() {
    for (;;) {
      const after = metrics.length ? `&after=${metrics[metrics.length - 1].step}` : "";
      const page = await api(`${base}/metrics?limit=1000${after}`);
      metrics.push(...page.data);
      if (!page.has_more || !page.data.length) return;
    }
  }

  async function findEstimate() {
    // The estimate is one of the job's first events (newest first, so near the end of the list).
    const all = await listAll(`${base}/events`, 1000000, 1000);
    const event = all.find((e) => e.data && typeof e.data.total === "number" && e.type === "message");
    return event ? event.data : null;
  }

  function renderHeader(job) {
    const buttons = h("div", {class: "actions"});
    if (!TERMINAL.has(job.status)) {
      if (!cancelArmed) {
        buttons.append(h("button", {type: "button", id: "cancel-job", class: "danger", onclick: () => {
          cancelArmed = true; renderHeader(job); document.getElementById("confirm-cancel").focus();
        }}, "Cancel job"));
      } else {
        const yes = h("button", {type: "button", id: "confirm-cancel", class: "danger"}, "Yes, cancel it");
        yes.addEventListener("click", () => act(yes, errors, async () => {
          const updated = await api(`${base}/cancel`, {method: "POST"});
          cancelArmed = false;
          renderHeader(updated);
          shownStatus = updated.status;
          renderSummary(updated);
          schedule(0);
        }));
        buttons.append(h("span", {class: "confirm"}, "Cancel this job?"), yes,
          h("button", {type: "button", id: "keep-job", onclick: () => { cancelArmed = false; shownStatus = null; schedule(0); }}, "Keep it"));
      }
    }
    if (job.status === "succeeded" && job.fine_tuned_model) {
      buttons.append(h("a", {class: "button", href: `#/chat?model=${encodeURIComponent(job.fine_tuned_model)}`}, "Try in chat"));
    }
    header.replaceChildren(h("h1", {}, "Job ", h("code", {}, job.id)), h("span", {id: "job-status"}, statusBadge(job.status)), buttons);
  }

  function renderSummary(job) {
    const rows = [
      ["Model", job.model],
      ["Fine-tuned model", job.fine_tuned_model ? h("code", {}, job.fine_tuned_model) : "—"],
      ["Created", fmtTime(job.created_at)],
      ["Finished", fmtTime(job.finished_at)],
      ["Duration", jobDuration(job)],
      ["Trained tokens", fmtNum(job.trained_tokens)],
      ["Training file", h("code", {}, job.training_file)],
      ["Validation file", job.validation_file ? h("code", {}, job.validation_file) : "—"],
      ["Seed", String(job.seed)],
    ];
    if (job.estimated_finish && !TERMINAL.has(job.status)) rows.push(["Estimated finish", fmtTime(job.estimated_finish)]);
    summary.replaceChildren(...rows.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
    if (job.error) {
      summary.append(h("dt", {}, "Error"), h("dd", {class: "error-inline"}, job.error.message, " ",
        h("code", {}, job.error.code), job.error.param ? [" (", h("code", {}, job.error.param), ")"] : null));
    }
  }

  function renderStats(job) {
    const last = (key) => { for (let i = metrics.length - 1; i >= 0; i -= 1) if (metrics[i][key] != null) return metrics[i][key]; return null; };
    const speeds = metrics.map((m) => m.tokens_per_second).filter((v) => v != null);
    const meanSpeed = speeds.length ? speeds.reduce((a, b) => a + b, 0) / speeds.length : null;
    const peaks = metrics.map((m) => m.peak_memory_bytes).filter((v) => v != null);
    const peak = peaks.length ? Math.max(...peaks) : null;
    const total = job.hyperparameters && job.hyperparameters.max_steps;
    const step = metrics.length ? metrics[metrics.length - 1].step : 0;
    const stat = (id, label, value, note) => h("div", {class: "stat", id}, h("span", {class: "stat-label"}, label),
      h("span", {class: "stat-value"}, value), note ? h("span", {class: "stat-note"}, note) : null);
    stats.replaceChildren(
      stat("stat-step", "Step", total ? `${step} of ${total}` : String(step), last("epoch") != null ? `epoch ${fmtNum(last("epoch"), 3)}` : null),
      stat("stat-loss", "Loss (train / validation)", `${fmtNum(last("train_loss"))} / ${fmtNum(last("valid_loss"))}`),
      stat("stat-accuracy", "Token accuracy (train / validation)",
        `${fmtPercent(last("train_mean_token_accuracy"))} / ${fmtPercent(last("valid_mean_token_accuracy"))}`),
      stat("stat-speed", "Tokens/s (latest)", fmtNum(last("tokens_per_second"), 5), meanSpeed != null ? `mean ${fmtNum(meanSpeed, 5)}` : null),
      stat("stat-memory", "Memory: estimate / measured peak",
        `${estimate ? fmtBytes(estimate.total) : "—"} / ${fmtBytes(peak)}`,
        "The estimate is GPU memory at the peak; the measurement is the GPU's peak on CUDA, else the process's peak resident memory."),
    );
    const steps = metrics.map((m) => m.step);
    const col = (key) => metrics.map((m) => (m[key] == null ? null : m[key]));
    drawLoss([steps, col("train_loss"), col("valid_loss")]);
    drawAcc([steps, col("train_mean_token_accuracy"), col("valid_mean_token_accuracy")]);
    drawLr([steps, col("learning_rate")]);
  }

  function renderCheckpoints(list) {
    if (!list.length) { checkpoints.replaceChildren(h("p", {class: "empty"}, "No checkpoints yet.")); return; }
    const errs = h("div", {});
    const rows = list.map((c) => {
      const button = h("button", {type: "button", class: "small", "aria-label": `Download checkpoint at step ${c.step_number}`}, "Download");
      button.addEventListener("click", () => act(button, errs, () => download(`${base}/checkpoints/${encodeURIComponent(c.id)}/content`, `${c.id}.tar.gz`)));
      return h("tr", {},
        h("td", {class: "num"}, String(c.step_number)),
        h("td", {class: "num"}, fmtNum(c.metrics.train_loss)),
        h("td", {class: "num"}, fmtNum(c.metrics.valid_loss)),
        h("td", {class: "num"}, fmtPercent(c.metrics.train_mean_token_accuracy)),
        h("td", {class: "num"}, fmtPercent(c.metrics.valid_mean_token_accuracy)),
        h("td", {}, h("code", {}, c.fine_tuned_model_checkpoint)),
        h("td", {}, button));
    });
    checkpoints.replaceChildren(errs, h("div", {class: "table-wrap"}, h("table", {},
      h("thead", {}, h("tr", {}, ["Step", "Train loss", "Valid loss", "Train acc.", "Valid acc.", "Model", ""].map((t) => h("th", {scope: "col"}, t)))),
      h("tbody", {}, rows))));
  }

  async function renderResults(job) {
    if (!job.result_files.length) {
      results.replaceChildren(h("p", {class: "empty"}, TERMINAL.has(job.status) ? "No result files." : "Result files appear when the job succeeds."));
      return;
    }
    for (const id of job.result_files) {
      if (!fileInfo.has(id)) {
        try { fileInfo.set(id, await api(`/v1/files/${encodeURIComponent(id)}`)); } catch (err) { fileInfo.set(id, {id, filename: id, bytes: null, error: err}); }
      }
    }
    const errs = h("div", {});
    const items = job.result_files.map((id) => {
      const f = fileInfo.get(id);
      const button = h("button", {type: "button", class: "small", dataset: {file: f.filename}, "aria-label": `Download ${f.filename}`}, "Download");
      button.addEventListener("click", () => act(button, errs, () => download(`/v1/files/${encodeURIComponent(id)}/content`, f.filename)));
      return h("li", {}, h("span", {class: "filename"}, f.filename), " ", h("span", {class: "muted"}, `(${fmtBytes(f.bytes)}, `, h("code", {}, id), ")"), " ", button);
    });
    results.replaceChildren(errs, h("ul", {class: "files"}, items));
  }

  function renderEvents(list) {
    if (!list.length) { events.replaceChildren(h("p", {class: "empty"}, "No events.")); return; }
    events.replaceChildren(h("div", {class: "table-wrap"}, h("table", {class: "events"},
      h("thead", {}, h("tr", {}, ["Time", "Level", "Message"].map((t) => h("th", {scope: "col"}, t)))),
      h("tbody", {}, list.map((e) => h("tr", {class: `level-${e.level}`},
        h("td", {}, fmtTime(e.created_at)), h("td", {}, e.level), h("td", {class: "message"}, e.message)))))));
  }

  function renderHyper(job) {
    const entries = Object.entries(job.hyperparameters || {});
    hyper.replaceChildren(h("details", {}, h("summary", {}, `All ${entries.length} resolved values`),
      h("dl", {class: "facts compact"}, entries.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, h("code", {}, JSON.stringify(v)))]))));
  }

  let hyperShown = false;
  let shownStatus = null;
  async function refresh() {
    const job = await api(base);
    await fetchNewMetrics();
    if (estimate === undefined) estimate = await findEstimate();
    const [eventPage, checkpointList] = await Promise.all([api(`${base}/events?limit=50`), listAll(`${base}/checkpoints`)]);
    if (!current.alive) return null;
    setTitle(`${job.id} (${job.status})`);
    // Rebuilt only when the status changes, so the focus stays on a button a person is about to press.
    if (job.status !== shownStatus && !cancelArmed) { renderHeader(job); shownStatus = job.status; }
    renderSummary(job);
    renderStats(job);
    renderCheckpoints(checkpointList);
    renderEvents(eventPage.data);
    if (!hyperShown) { renderHyper(job); hyperShown = true; }
    await renderResults(job);
    return job;
  }

  // One refresh after another (never two at once), every POLL_MS while the job can still change.
  function schedule(delay) {
    clearTimeout(timer);
    timer = setTimeout(async () => {
      let job = null;
      try {
        job = await refresh();
        errors.replaceChildren();
      } catch (err) {
        if (current.alive) errors.replaceChildren(errorBox(err));
        if (err instanceof ApiError && (err.status === 404 || err.status === 401)) return;
      }
      if (current.alive && (!job || !TERMINAL.has(job.status))) schedule(POLL_MS);
    }, delay);
  }

  try {
    const job = await refresh();
    if (job && !TERMINAL.has(job.status)) schedule(POLL_MS);
  } catch (err) {
    if (!current.alive) return;
    errors.replaceChildren(errorBox(err));
    if (err instanceof ApiError && (err.status === 404 || err.status === 401)) {
      header.replaceChildren(h("h1", {}, "Job ", h("code", {}, jobId)));
      for (const section of main.querySelectorAll("section")) section.hidden = true;
    } else {
      schedule(POLL_MS); // a passing outage: keep asking
    }
  }
}

// --- upload ----------------------------------------------------------------------------------------------------

// The API's status_details ("line 3: invalid_file_format: not valid JSON; ...; (12 problems in all)") as list items.
function faultItems(details) {
  return details.split("; ").map((part) => {
    const line = part.match(/^line (\d+): ([\w.-]+): ([\s\S]*)$/);
    if (line) {
      return h("li", {dataset: {line: line[1]}}, h("strong", {}, `Line ${line[1]}`), ": ", line[3], " ", h("code", {}, line[2]));
    }
    const whole = part.match(/^([a-z_]+): ([\s\S]*)$/);
    if (whole) return h("li", {}, h("strong", {}, "Whole file"), ": ", whole[2], " ", h("code", {}, whole[1]));
    return h("li", {class: "muted"}, part);
  });
}

async function uploadPage(current) {
  setTitle("Upload");
  const errors = h("div", {});
  const result = h("div", {id: "upload-result", "aria-live": "polite"});
  const input = h("input", {id: "upload-file", name: "file", type: "file", accept: ".jsonl,.json,.txt,application/jsonl", required: true,
                            "aria-describedby": "upload-help"});
  const button = h("button", {type: "submit", id: "upload-button"}, "Upload and validate");
  const form = h("form", {class: "card", id: "upload-form"},
    h("h1", {}, "Upload training data"),
    h("label", {for: "upload-file"}, "JSONL file"),
    input,
    h("p", {id: "upload-help", class: "help"},
      "One chat example a line: {\"messages\": [{\"role\": \"user\", ...}, {\"role\": \"assistant\", ...}]}. ",
      "The API validates every line as it stores the file and names the lines at fault (docs/training.md)."),
    button, errors, result);
  const list = h("div", {id: "files-list"});
  main.append(form, h("section", {"aria-labelledby": "h-files"}, h("h2", {id: "h-files"}, "Your files"), list));

  async function showFiles() {
    const page = await api("/v1/files?limit=50&purpose=fine-tune");
    if (!current.alive) return;
    if (!page.data.length) { list.replaceChildren(h("p", {class: "empty"}, "No files yet.")); return; }
    list.replaceChildren(h("div", {class: "table-wrap"}, h("table", {},
      h("thead", {}, h("tr", {}, ["File", "Name", "Status", "Size", "Uploaded"].map((t) => h("th", {scope: "col"}, t)))),
      h("tbody", {}, page.data.map((f) => h("tr", {},
        h("td", {}, h("code", {}, f.id)), h("td", {}, f.filename), h("td", {}, statusBadge(f.status)),
        h("td", {class: "num"}, fmtBytes(f.bytes)), h("td", {}, fmtTime(f.created_at))))))));
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    act(button, errors, async () => {
      result.replaceChildren();
      const file = input.files[0];
      if (!file) throw new Error("Choose a file first.");
      const body = new FormData();
      body.append("purpose", "fine-tune");
      body.append("file", file, file.name);
      const uploaded = await api("/v1/files", {method: "POST", form: body});
      if (uploaded.status === "error") {
        result.replaceChildren(h("div", {class: "faults", role: "alert"},
          h("h2", {}, `${uploaded.filename} has faults`),
          h("p", {}, "The file was stored as ", h("code", {}, uploaded.id), " with status error; no job can use it. Fix these lines and upload it again:"),
          h("ul", {id: "fault-list"}, faultItems(uploaded.status_details || ""))));
      } else {
        result.replaceChildren(h("div", {class: "ok", role: "status"},
          h("p", {}, `${uploaded.filename} is valid: `, h("code", {}, uploaded.id), ` (${fmtBytes(uploaded.bytes)}). `),
          h("p", {}, h("a", {href: `#/new?training_file=${encodeURIComponent(uploaded.id)}`}, "Create a job with it"))));
      }
      await showFiles();
    });
  });
  await showFiles();
}

// --- create a job ----------------------------------------------------------------------------------------------

let openapiCache = null;

// The typed hyperparameters object of the create-job body and the training methods, from the service's own
// OpenAPI document.
async function hyperparameterSchema() {
  openapiCache = openapiCache || await (await fetch("/openapi.json")).json();
  const schemas = openapiCache.components.schemas;
  const holder = schemas.JobCreate.properties.hyperparameters;
  const typed = (holder.anyOf || [holder]).find((s) => s.properties) || {};
  return {job: schemas.JobCreate, hyper: typed, methods: schemas.Method.properties.type};
}

// The kinds of value a property takes: its types, its fixed strings (enum/const), and whether it may be null.
function valueKinds(prop) {
  const alts = prop.anyOf || [prop];
  const kinds = {types: new Set(), choices: [], nullable: false};
  for (const alt of alts) {
    if (alt.type === "null") { kinds.nullable = true; continue; }
    if (alt.enum) kinds.choices.push(...alt.enum);
    else if (alt.const !== undefined) kinds.choices.push(alt.const);
    else if (alt.type) kinds.types.add(alt.type);
  }
  return kinds;
}

// One labelled input for a hyperparameter; its default is the placeholder (left empty, the key is not sent).
function hyperInput(name, prop) {
  const id = `hp-${name}`;
  const kinds = valueKinds(prop);
  const dflt = prop.default === undefined || prop.default === null ? "" : JSON.stringify(prop.default).replace(/^"|"$/g, "");
  let input;
  const onlyChoices = kinds.types.size === 0 || (kinds.types.size === 1 && kinds.types.has("boolean"));
  if (onlyChoices && (kinds.choices.length || kinds.types.has("boolean"))) {
    const options = [...kinds.choices, ...(kinds.types.has("boolean") ? ["true", "false"] : [])];
    input = h("select", {id, name},
      h("option", {value: ""}, dflt ? `default (${dflt})` : "default"),
      options.map((o) => h("option", {value: String(o)}, String(o))));
  } else {
    const numeric = kinds.types.has("integer") || kinds.types.has("number");
    input = h("input", {id, name, type: "text", placeholder: dflt || (kinds.nullable ? "none" : ""),
                        inputmode: numeric && !kinds.choices.length ? "decimal" : null, autocomplete: "off"});
  }
  input.setAttribute("aria-describedby", `${id}-desc`);
  input.dataset.hyper = name;
  const range = [];
  for (const alt of prop.anyOf || [prop]) {
    if (alt.minimum !== undefined) range.push(`min ${alt.minimum}`);
    if (alt.exclusiveMinimum !== undefined) range.push(`> ${alt.exclusiveMinimum}`);
    if (alt.maximum !== undefined) range.push(`max ${alt.maximum}`);
    if (alt.exclusiveMaximum !== undefined) range.push(`< ${alt.exclusiveMaximum}`);
  }
  const typeText = [...kinds.types, ...kinds.choices.map((c) => JSON.stringify(c)), ...(kinds.nullable ? ["none"] : [])].join(" | ");
  return h("div", {class: "field"},
    h("label", {for: id}, name),
    input,
    h("p", {class: "help", id: `${id}-desc`}, prop.description || "", " ",
      h("span", {class: "muted"}, `(${typeText}${range.length ? `; ${range.join(", ")}` : ""}; default ${dflt || "none"})`)));
}

// A typed value from a text field, following the schema: numbers, true/false, a list ("a, b" or JSON), else the text.
function parseHyper(prop, text) {
  const kinds = valueKinds(prop);
  if (kinds.choices.includes(text)) return text;
  if (kinds.types.has("boolean") && (text === "true" || text === "false")) return text === "true";
  if ((kinds.types.has("integer") || kinds.types.has("number")) && text !== "" && !Number.isNaN(Number(text))) return Number(text);
  if (kinds.types.has("array")) {
    if (text.startsWith("[")) { try { return JSON.parse(text); } catch { return text; } }
    return text.split(",").map((s) => s.trim()).filter(Boolean);
  }
  return text; // the API answers a wrong value with an envelope naming the key
}

const OPENAI_KEYS = ["n_epochs", "batch_size", "learning_rate_multiplier"];

async function newJobPage(current) {
  setTitle("New job");
  const params = routeParams();
  const [{job: jobSchema, hyper, methods}, models, files] = await Promise.all([
    hyperparameterSchema(), api("/v1/models"), listAll("/v1/files?purpose=fine-tune", 1000)]);
  if (!current.alive) return;
  const usable = files.filter((f) => f.status === "processed");
  const describe = (name) => (jobSchema.properties[name] && jobSchema.properties[name].description) || "";
  const errors = h("div", {id: "create-errors"});
  const field = (id, label, input, help) => h("div", {class: "field"}, h("label", {for: id}, label), input,
    help ? h("p", {class: "help", id: `${id}-desc`}, help) : null);

  const modelSelect = h("select", {id: "job-model", name: "model", required: true, "aria-describedby": "job-model-desc"},
    models.data.filter((m) => m.owned_by === "system").map((m) => h("option", {value: m.id}, m.id)));
  const fileOptions = (selected) => usable.map((f) => h("option", {value: f.id, selected: f.id === selected}, `${f.filename} (${f.id})`));
  const trainSelect = h("select", {id: "job-training-file", name: "training_file", required: true, "aria-describedby": "job-training-file-desc"},
    fileOptions(params.get("training_file")));
  const validSelect = h("select", {id: "job-validation-file", name: "validation_file", "aria-describedby": "job-validation-file-desc"},
    h("option", {value: ""}, "none"), fileOptions(null));
  const suffix = h("input", {id: "job-suffix", name: "suffix", type: "text", maxlength: 64, autocomplete: "off", "aria-describedby": "job-suffix-desc"});
  const seed = h("input", {id: "job-seed", name: "seed", type: "text", inputmode: "numeric", autocomplete: "off", "aria-describedby": "job-seed-desc"});
  const methodSelect = h("select", {id: "job-method", name: "type", required: true, "aria-describedby": "job-method-desc"},
    methods.enum.map((m) => h("option", {value: m}, m)));

  const props = hyper.properties || {};
  const openaiFields = OPENAI_KEYS.filter((k) => props[k]).map((k) => hyperInput(k, props[k]));
  const engineNames = Object.keys(props).filter((k) => !OPENAI_KEYS.includes(k));
  const button = h("button", {type: "submit", id: "create-job"}, "Create job");
  const form = h("form", {class: "card", id: "new-job-form"},
    h("h1", {}, "New fine-tuning job"),
    !usable.length ? h("p", {class: "warn"}, "No validated file yet: ", h("a", {href: "#/upload"}, "upload one"), " first.") : null,
    field("job-model", "Base model", modelSelect, describe("model")),
    field("job-training-file", "Training file", trainSelect, "A validated upload (at least 10 examples)."),
    field("job-validation-file", "Validation file", validSelect, "Optional: evaluated every eval_every steps and at the end."),
    field("job-suffix", "Suffix", suffix, "Part of the fine-tuned model's name (1 to 64 characters, no ':')."),
    field("job-seed", "Seed", seed, "Optional; the job draws one when empty."),
    field("job-method", "Method", methodSelect, methods.description),
    h("fieldset", {}, h("legend", {}, "Hyperparameters"), openaiFields),
    h("details", {id: "engine-options"}, h("summary", {}, `Engine options (${engineNames.length})`),
      h("p", {class: "help"}, "From the service's OpenAPI document; leave a field empty for its default."),
      engineNames.map((k) => hyperInput(k, props[k]))),
    button, errors);
  main.append(form);

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    for (const el of form.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
    act(button, errors, async () => {
      const hyperparameters = {};
      for (const el of form.querySelectorAll("[data-hyper]")) {
        const text = el.value.trim();
        if (text !== "") hyperparameters[el.dataset.hyper] = parseHyper(props[el.dataset.hyper], text);
      }
      const body = {model: modelSelect.value, training_file: trainSelect.value,
                    method: {type: methodSelect.value, [methodSelect.value]: {hyperparameters}}};
      if (validSelect.value) body.validation_file = validSelect.value;
      if (suffix.value.trim()) body.suffix = suffix.value.trim();
      if (seed.value.trim()) body.seed = Number.isNaN(Number(seed.value)) ? seed.value.trim() : Number(seed.value);
      try {
        const created = await api("/v1/fine_tuning/jobs", {method: "POST", json: body});
        location.hash = `#/jobs/${encodeURIComponent(created.id)}`;
      } catch (err) {
        // Point at the field the error names (its last path part), so a keyboard user lands on it.
        const name = err.param ? String(err.param).split(".").pop() : null;
        const target = name && (form.querySelector(`[data-hyper="${CSS.escape(name)}"]`) || form.querySelector(`[name="${CSS.escape(name)}"]`));
        if (target) {
          target.setAttribute("aria-invalid", "true");
          const details = target.closest("details");
          if (details) details.open = true;
        }
        throw err;
      }
    });
  });
}

// --- chat ------------------------------------------------------------------------------------------------------

async function chatPage(current) {
  setTitle("Chat");
  const params = routeParams();
  const models = await api("/v1/models");
  if (!current.alive) return;
  const wanted = params.get("model");
  const ordered = [...models.data.filter((m) => m.owned_by !== "system").reverse(), ...models.data.filter((m) => m.owned_by === "system")];
  const modelSelect = h("select", {id: "chat-model", name: "model"},
    ordered.map((m) => h("option", {value: m.id, selected: m.id === wanted}, m.owned_by === "system" ? `${m.id} (base)` : m.id)));
  const temperature = h("input", {id: "chat-temperature", type: "text", inputmode: "decimal", value: "0", autocomplete: "off"});
  const maxTokens = h("input", {id: "chat-max-tokens", type: "text", inputmode: "numeric", value: "64", autocomplete: "off"});
  const message = h("textarea", {id: "chat-message", name: "message", rows: 3, required: true});
  const transcript = h("ol", {id: "chat-transcript", class: "transcript", "aria-live": "polite"});
  const errors = h("div", {});
  const send = h("button", {type: "submit", id: "chat-send"}, "Send");
  const clear = h("button", {type: "button", id: "chat-clear"}, "New conversation");
  const history = [];
  const form = h("form", {class: "card", id: "chat-form"},
    h("h1", {}, "Chat"),
    h("p", {class: "help"}, "Try a base or fine-tuned model through POST /v1/chat/completions."),
    h("div", {class: "row"},
      h("div", {class: "field grow"}, h("label", {for: "chat-model"}, "Model"), modelSelect),
      h("div", {class: "field"}, h("label", {for: "chat-temperature"}, "Temperature"), temperature),
      h("div", {class: "field"}, h("label", {for: "chat-max-tokens"}, "Max tokens"), maxTokens)),
    transcript,
    h("div", {class: "field"}, h("label", {for: "chat-message"}, "Message"), message,
      h("p", {class: "help"}, "Ctrl+Enter sends.")),
    h("div", {class: "actions"}, send, clear),
    errors);
  main.append(form);
  const say = (role, text, note) => transcript.append(h("li", {class: `msg msg-${role}`}, h("span", {class: "role"}, role), h("p", {}, text),
    note ? h("span", {class: "muted"}, note) : null));
  message.addEventListener("keydown", (event) => { if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) form.requestSubmit(); });
  clear.addEventListener("click", () => { history.length = 0; transcript.replaceChildren(); errors.replaceChildren(); message.focus(); });
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = message.value.trim();
    if (!text) return;
    act(send, errors, async () => {
      const body = {model: modelSelect.value, messages: [...history, {role: "user", content: text}],
                    temperature: Number(temperature.value), max_tokens: Number(maxTokens.value)};
      const reply = await api("/v1/chat/completions", {method: "POST", json: body});
      history.push({role: "user", content: text});
      say("user", text);
      const answer = reply.choices[0].message.content || "";
      history.push({role: "assistant", content: answer});
      say("assistant", answer, `${reply.usage ? `${reply.usage.completion_tokens} tokens, ` : ""}finish: ${reply.choices[0].finish_reason}`);
      message.value = "";
      message.focus();
    });
  });
}

// --- start -----------------------------------------------------------------------------------------------------

document.getElementById("sign-out").addEventListener("click", signOut);
document.getElementById("skip-link").addEventListener("click", (event) => { event.preventDefault(); main.focus(); });
window.addEventListener("hashchange", route);
// A link to the page already shown renders it afresh (a new empty form), as a hash change would.
document.getElementById("nav").addEventListener("click", (event) => {
  const link = event.target.closest("a");
  if (link && link.getAttribute("href") === location.hash) route();
});
route();
