// #/jobs: the project's jobs, newest first, with a status filter and pages of PAGE_SIZE.

import {api} from "../api.js";
import {fmtNum, fmtTime, jobDuration, STATUSES} from "../format.js";
import {h, main, routeParams, setTitle, statusBadge} from "../dom.js";

const PAGE_SIZE = 20;

export async function jobsPage(current) {
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
