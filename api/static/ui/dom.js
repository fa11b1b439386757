// Building the page: elements from data (never HTML strings), errors as a person reads them, the page title and
// the hash route's query.

import {api, ApiError} from "./api.js";

// The element the pages render into.
export const main = document.getElementById("main");

// h("a", {href: "#/jobs"}, "Jobs"): an element with attributes and children (text nodes, never HTML).
export function h(tag, attrs, ...children) {
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

export function statusBadge(status) {
  return h("span", {class: `badge status-${status}`}, status);
}

// The query string of a hash route (#/jobs?status=running) as URLSearchParams.
export function routeParams() {
  const hash = location.hash;
  const q = hash.indexOf("?");
  return new URLSearchParams(q >= 0 ? hash.slice(q + 1) : "");
}

export function setTitle(text) {
  document.title = `${text} · QLoRA dashboard`;
}

// An API error as a person reads it: the message, then the code and the parameter it names.
export function errorBox(err) {
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
export async function act(button, errors, fn) {
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

// A download needs the Authorization header, so it is fetched and handed to the browser as a blob.
export async function download(path, filename) {
  const res = await api(path, {raw: true});
  const blob = await res.blob();
  const url = URL.createObjectURL(blob);
  const link = h("a", {href: url, download: filename, hidden: true});
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60000);
}

// A form of one labelled input (its help text tied to it by the input's aria-describedby) under a heading, then
// `rest` (its button, where its messages go).
export function oneFieldForm({id, cls, title, label, input, help}, ...rest) {
  return h("form", {class: cls, id}, h("h1", {}, title), h("label", {for: input.id}, label), input,
    h("p", {id: input.getAttribute("aria-describedby"), class: "help"}, ...help), ...rest);
}
