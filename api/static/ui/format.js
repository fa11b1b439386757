// Numbers, bytes, times and durations as the pages show them; "—" for a value that is missing.

export const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
export const STATUSES = ["queued", "running", "paused", "succeeded", "failed", "cancelled"];
// The statuses POST .../pause accepts (a running job pauses after its current step); resume takes a paused one.
export const PAUSABLE = new Set(["queued", "running"]);

export function fmtTime(unix) {
  return unix ? new Date(unix * 1000).toLocaleString() : "—";
}

export function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined || seconds < 0) return "—";
  const s = Math.round(seconds);
  const parts = [Math.floor(s / 3600), Math.floor((s % 3600) / 60), s % 60];
  return parts[0] ? `${parts[0]}h ${parts[1]}m ${parts[2]}s` : parts[1] ? `${parts[1]}m ${parts[2]}s` : `${parts[2]}s`;
}

export function jobDuration(job) {
  if (job.finished_at) return fmtDuration(job.finished_at - job.created_at);
  if (TERMINAL.has(job.status)) return "—";
  return `${fmtDuration(Date.now() / 1000 - job.created_at)} so far`;
}

export function fmtBytes(n) {
  if (n === null || n === undefined) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${i ? n.toFixed(2) : n} ${units[i]}`;
}

export function fmtNum(x, digits = 4) {
  if (x === null || x === undefined || Number.isNaN(x)) return "—";
  if (Number.isInteger(x)) return x.toLocaleString();
  return Math.abs(x) < 1e-3 ? x.toExponential(2) : x.toPrecision(digits);
}

// An axis tick: three significant digits, exponent notation for small values (learning rates).
export function fmtTick(v) {
  if (v === 0) return "0";
  return Math.abs(v) < 0.01 ? v.toExponential(1) : String(Number(v.toPrecision(3)));
}

export function fmtPercent(x) {
  return x === null || x === undefined ? "—" : `${(100 * x).toFixed(1)} %`;
}
