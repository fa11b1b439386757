// The API client: every call carries the signed-in key as "Authorization: Bearer KEY"; the key lives in
// sessionStorage only (docs/dashboard.md).

const KEY_STORAGE = "qlora.apiKey";

export class ApiError extends Error {
  constructor(status, envelope) {
    const err = (envelope && envelope.error) || {};
    super(err.message || `HTTP ${status}`);
    this.status = status;
    this.code = err.code || null;
    this.param = err.param || null;
    this.type = err.type || null;
  }
}

export function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE);
}

export function signIn(key) {
  sessionStorage.setItem(KEY_STORAGE, key);
}

export function forgetKey() {
  sessionStorage.removeItem(KEY_STORAGE);
}

// fetch with the key; an answer other than 2xx becomes an ApiError carrying the envelope's message, code and param.
export async function api(path, {method = "GET", json, form, raw = false, key} = {}) {
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
export async function listAll(path, max = 1000, pageSize = 100) {
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
