// Hash routing: the page of `location.hash` rendered into <main>; without a key, the sign-in page first (and the
// page asked for after it).

import {apiKey} from "./api.js";
import {errorBox, h, main} from "./dom.js";

let view = {alive: false, cleanups: []}; // the current page: its timers and charts are dropped when the route changes

function leaveView() {
  view.alive = false;
  for (const fn of view.cleanups) fn();
  view = {alive: true, cleanups: []};
  return view;
}

let routes = [];

export async function route() {
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

// Renders the current route, and again at every hash change; `pages` is [[pattern, page], ...] and a page is
// called as page(view, ...the pattern's groups), `view.alive` false once the route changed.
export function startRouter(pages) {
  routes = pages;
  window.addEventListener("hashchange", route);
  route();
}
