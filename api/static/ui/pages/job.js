// #/jobs/{id}: one job's summary, progress, curves, checkpoints, result files, events and hyperparameters, polled
// while the job can still change. The renderers below each fill one section from what the API answered;
// jobPage builds the sections and runs the polling.

import {api, ApiError, listAll} from "../api.js";
import {chartBox, COLORS, lineChart} from "../charts.js";
import {act, download, errorBox, h, main, setTitle, statusBadge} from "../dom.js";
import {fmtBytes, fmtNum, fmtPercent, fmtTime, jobDuration, PAUSABLE, TERMINAL} from "../format.js";

const POLL_MS = 1000; // how often the page asks for news while the job is queued or running

function renderSummary(summary, job) {
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

// The step, latest losses and accuracies, speed and memory from `metrics` (every step so far, ascending) and the
// job's own total_steps and memory_estimate.
function renderStats(stats, job, metrics, dpo) {
  const last = (key) => { for (let i = metrics.length - 1; i >= 0; i -= 1) if (metrics[i][key] != null) return metrics[i][key]; return null; };
  const speeds = metrics.map((m) => m.tokens_per_second).filter((v) => v != null);
  const meanSpeed = speeds.length ? speeds.reduce((a, b) => a + b, 0) / speeds.length : null;
  const peaks = metrics.map((m) => m.peak_memory_bytes).filter((v) => v != null);
  const peak = peaks.length ? Math.max(...peaks) : null;
  const total = job.total_steps ?? (job.hyperparameters && job.hyperparameters.max_steps);
  const step = metrics.length ? metrics[metrics.length - 1].step : 0;
  const estimate = job.memory_estimate;
  const stat = (id, label, value, note) => h("div", {class: "stat", id}, h("span", {class: "stat-label"}, label),
    h("span", {class: "stat-value"}, value), note ? h("span", {class: "stat-note"}, note) : null);
  stats.replaceChildren(...[
    stat("stat-step", "Step", total ? `${step} of ${total}` : String(step), last("epoch") != null ? `epoch ${fmtNum(last("epoch"), 3)}` : null),
    stat("stat-loss", "Loss (train / validation)", `${fmtNum(last("train_loss"))} / ${fmtNum(last("valid_loss"))}`),
    dpo
      ? [stat("stat-reward-accuracy", "Reward accuracy (train / validation)",
          `${fmtPercent(last("train_rewards_accuracies"))} / ${fmtPercent(last("valid_rewards_accuracies"))}`,
          "Share of pairs whose preferred answer has the higher reward; it can reach 100% while answers barely move."),
         stat("stat-reward-margin", "Reward margin (train / validation)",
          `${fmtNum(last("train_rewards_margins"))} / ${fmtNum(last("valid_rewards_margins"))}`)]
      : stat("stat-accuracy", "Token accuracy (train / validation)",
        `${fmtPercent(last("train_mean_token_accuracy"))} / ${fmtPercent(last("valid_mean_token_accuracy"))}`),
    stat("stat-speed", "Tokens/s (latest)", fmtNum(last("tokens_per_second"), 5), meanSpeed != null ? `mean ${fmtNum(meanSpeed, 5)}` : null),
    stat("stat-memory", "Memory: estimate / measured peak",
      `${estimate ? fmtBytes(estimate.total) : "—"} / ${fmtBytes(peak)}`,
      "The estimate is GPU memory at the peak; the measurement is the GPU's peak on CUDA, else the process's peak resident memory."),
  ].flat());
}

function renderCheckpoints(checkpoints, base, list) {
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

// `fileInfo` (result file id -> FileObject) keeps each file's facts across polls: they never change.
async function renderResults(results, job, fileInfo) {
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

function renderEvents(events, list) {
  if (!list.length) { events.replaceChildren(h("p", {class: "empty"}, "No events.")); return; }
  events.replaceChildren(h("div", {class: "table-wrap"}, h("table", {class: "events"},
    h("thead", {}, h("tr", {}, ["Time", "Level", "Message"].map((t) => h("th", {scope: "col"}, t)))),
    h("tbody", {}, list.map((e) => h("tr", {class: `level-${e.level}`},
      h("td", {}, fmtTime(e.created_at)), h("td", {}, e.level), h("td", {class: "message"}, e.message)))))));
}

function renderHyper(hyper, job) {
  const entries = Object.entries(job.hyperparameters || {});
  hyper.replaceChildren(h("details", {}, h("summary", {}, `All ${entries.length} resolved values`),
    h("dl", {class: "facts compact"}, entries.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, h("code", {}, JSON.stringify(v)))]))));
}

function section(id, title, ...content) {
  return h("section", {"aria-labelledby": id}, h("h2", {id}, title), ...content);
}

export async function jobPage(current, jobId) {
  setTitle(jobId);
  const base = `/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}`;
  const errors = h("div", {id: "job-errors"}); // the polling's errors, cleared by the next answer
  const actionErrors = h("div", {id: "action-errors"}); // a button's error, kept until the next button is pressed
  const header = h("div", {class: "title-row"});
  const summary = h("dl", {class: "facts", id: "job-summary"});
  const stats = h("div", {class: "stats", id: "job-stats"});
  const lossBox = chartBox("loss", "Loss");
  const accBox = chartBox("accuracy", "Token accuracy");
  const lrBox = chartBox("learning-rate", "Learning rate");
  // A dpo job's curves in place of the token accuracy (which it does not have); shown once the job says its method.
  const rewardAccBox = chartBox("reward-accuracy", "Reward accuracy");
  const marginBox = chartBox("reward-margin", "Reward margin");
  rewardAccBox.hidden = marginBox.hidden = true;
  const checkpoints = h("div", {id: "checkpoints"});
  const results = h("div", {id: "result-files"});
  const events = h("div", {id: "events"});
  const hyper = h("div", {id: "hyperparameters"});
  const curves = section("h-curves", "Curves", lossBox, accBox, rewardAccBox, marginBox, lrBox);
  curves.classList.add("charts");
  main.append(header, actionErrors, errors,
    section("h-summary", "Summary", summary, stats),
    curves,
    section("h-checkpoints", "Checkpoints", checkpoints),
    section("h-results", "Result files", results),
    section("h-events", "Events", events),
    section("h-hyper", "Hyperparameters", hyper));

  const drawLoss = lineChart(current, lossBox, {title: "Loss", yLabel: "loss",
    series: [{label: "train loss", color: COLORS.train}, {label: "validation loss", color: COLORS.valid}]});
  const drawAcc = lineChart(current, accBox, {title: "Token accuracy", yLabel: "accuracy",
    series: [{label: "train accuracy", color: COLORS.train}, {label: "validation accuracy", color: COLORS.valid}]});
  const drawLr = lineChart(current, lrBox, {title: "Learning rate", yLabel: "learning rate",
    series: [{label: "learning rate", color: COLORS.lr}]});
  const drawRewardAcc = lineChart(current, rewardAccBox, {title: "Reward accuracy", yLabel: "reward accuracy",
    series: [{label: "train reward accuracy", color: COLORS.train}, {label: "validation reward accuracy", color: COLORS.valid}]});
  const drawMargin = lineChart(current, marginBox, {title: "Reward margin", yLabel: "margin",
    series: [{label: "train reward margin", color: COLORS.train}, {label: "validation reward margin", color: COLORS.valid}]});

  const metrics = []; // every step so far, ascending; new ones are fetched with `after` = the last step
  const fileInfo = new Map();
  let cancelArmed = false;
  let pauseRequested = false; // a running job's pause was accepted: it pauses after its current step
  let hyperShown = false;
  let shownStatus = null;
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

  function drawCurves(dpo) {
    const steps = metrics.map((m) => m.step);
    const col = (key) => metrics.map((m) => (m[key] == null ? null : m[key]));
    drawLoss([steps, col("train_loss"), col("valid_loss")]);
    accBox.hidden = dpo;
    rewardAccBox.hidden = marginBox.hidden = !dpo;
    if (dpo) {
      drawRewardAcc([steps, col("train_rewards_accuracies"), col("valid_rewards_accuracies")]);
      drawMargin([steps, col("train_rewards_margins"), col("valid_rewards_margins")]);
    } else {
      drawAcc([steps, col("train_mean_token_accuracy"), col("valid_mean_token_accuracy")]);
    }
    drawLr([steps, col("learning_rate")]);
  }

  // After a button's request: the job as the API answered it, shown at once, then polled again.
  function showUpdated(updated) {
    renderHeader(updated);
    shownStatus = updated.status;
    renderSummary(summary, updated);
    schedule(0);
  }

  // A button that POSTs `action` (pause, resume) and shows the job the API answers, or its error.
  function moveButton(id, label, action) {
    const button = h("button", {type: "button", id}, label);
    button.addEventListener("click", () => act(button, actionErrors, async () => {
      const updated = await api(`${base}/${action}`, {method: "POST"});
      // A running job answers `running` until its worker has written the pause checkpoint.
      pauseRequested = action === "pause" && updated.status === "running";
      showUpdated(updated);
    }));
    return button;
  }

  // The title row with its buttons: "Pause job" while queued or running (a running one pauses after its current
  // step), "Resume job" while paused, "Cancel job" (asks to confirm first) until the job ends, "Try in chat" once
  // it succeeded.
  function renderHeader(job) {
    const buttons = h("div", {class: "actions"});
    if (PAUSABLE.has(job.status)) {
      if (pauseRequested && job.status === "running") {
        buttons.append(h("span", {id: "pause-pending", class: "muted"}, "Pausing after the current step…"));
      } else {
        buttons.append(moveButton("pause-job", "Pause job", "pause"));
      }
    }
    if (job.status === "paused") buttons.append(moveButton("resume-job", "Resume job", "resume"));
    if (!TERMINAL.has(job.status)) {
      if (!cancelArmed) {
        buttons.append(h("button", {type: "button", id: "cancel-job", class: "danger", onclick: () => {
          cancelArmed = true; renderHeader(job); document.getElementById("confirm-cancel").focus();
        }}, "Cancel job"));
      } else {
        const yes = h("button", {type: "button", id: "confirm-cancel", class: "danger"}, "Yes, cancel it");
        yes.addEventListener("click", () => act(yes, actionErrors, async () => {
          const updated = await api(`${base}/cancel`, {method: "POST"});
          cancelArmed = false;
          showUpdated(updated);
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

  async function refresh() {
    const job = await api(base);
    await fetchNewMetrics();
    const [eventPage, checkpointList] = await Promise.all([api(`${base}/events?limit=50`), listAll(`${base}/checkpoints`)]);
    if (!current.alive) return null;
    setTitle(`${job.id} (${job.status})`);
    // Rebuilt only when the status changes, so the focus stays on a button a person is about to press.
    if (job.status !== shownStatus && !cancelArmed) {
      if (job.status !== "running") pauseRequested = false;
      renderHeader(job);
      shownStatus = job.status;
    }
    renderSummary(summary, job);
    const dpo = Boolean(job.method && job.method.type === "dpo");
    renderStats(stats, job, metrics, dpo);
    drawCurves(dpo);
    renderCheckpoints(checkpoints, base, checkpointList);
    renderEvents(events, eventPage.data);
    if (!hyperShown) { renderHyper(hyper, job); hyperShown = true; }
    await renderResults(results, job, fileInfo);
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
      for (const s of main.querySelectorAll("section")) s.hidden = true;
    } else {
      schedule(POLL_MS); // a passing outage: keep asking
    }
  }
}
