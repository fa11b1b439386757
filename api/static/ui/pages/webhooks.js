// #/webhooks: the project's webhook endpoints (create, with the signing secret shown once; delete), and
// #/webhooks/{id}: one endpoint's delivery log, each delivery with its attempts (docs/api.md, "Webhooks").

import {api} from "../api.js";
import {act, errorBox, h, main, setTitle, statusBadge} from "../dom.js";
import {fmtTime} from "../format.js";

const EVENT_TYPES = ["fine_tuning.job.succeeded", "fine_tuning.job.failed", "fine_tuning.job.cancelled"];

function endpointState(endpoint) {
  return endpoint.enabled ? statusBadge("enabled") : h("span", {}, statusBadge("disabled"), " ", endpoint.disabled_reason || "");
}

export async function webhooksPage(current) {
  setTitle("Webhooks");
  const errors = h("div", {});
  const created = h("div", {id: "webhook-created", "aria-live": "polite"});
  const url = h("input", {id: "webhook-url", name: "url", type: "url", required: true, placeholder: "https://app.example/hooks",
                          "aria-describedby": "webhook-url-help"});
  const name = h("input", {id: "webhook-name", name: "name", type: "text", maxlength: 256});
  const boxes = EVENT_TYPES.map((type) => h("input", {type: "checkbox", id: `webhook-event-${type.split(".").pop()}`, value: type, checked: true}));
  const button = h("button", {type: "submit", id: "webhook-create"}, "Create endpoint");
  const form = h("form", {class: "card", id: "webhook-form"}, h("h1", {}, "Webhooks"),
    h("label", {for: url.id}, "Endpoint URL"), url,
    h("p", {id: "webhook-url-help", class: "help"}, "The service POSTs a signed event here when one of this project's jobs ends. ",
      "Verify it with the SDK's client.webhooks.unwrap and the signing secret shown once after creation."),
    h("label", {for: name.id}, "Name (optional)"), name,
    h("fieldset", {}, h("legend", {}, "Events"), EVENT_TYPES.map((type, i) => h("div", {}, boxes[i], " ", h("label", {for: boxes[i].id}, type)))),
    button, errors, created);
  const list = h("div", {id: "webhooks-list"});
  main.append(form, h("section", {"aria-labelledby": "h-endpoints"}, h("h2", {id: "h-endpoints"}, "Endpoints"), list));

  async function showEndpoints() {
    const page = await api("/v1/webhook_endpoints?limit=100");
    if (!current.alive) return;
    if (!page.data.length) { list.replaceChildren(h("p", {class: "empty"}, "No webhook endpoints yet.")); return; }
    list.replaceChildren(h("div", {class: "table-wrap"}, h("table", {id: "webhooks-table"},
      h("thead", {}, h("tr", {}, ["Endpoint", "URL", "Events", "State", "Created", ""].map((t) => h("th", {scope: "col"}, t)))),
      h("tbody", {}, page.data.map((e) => {
        const remove = h("button", {type: "button", class: "danger", "aria-label": `Delete ${e.name || e.id}`}, "Delete");
        const rowErrors = h("div", {});
        remove.addEventListener("click", () => act(remove, rowErrors, async () => {
          if (!window.confirm(`Delete the webhook endpoint ${e.url}? Its pending deliveries are dropped.`)) return;
          await api(`/v1/webhook_endpoints/${encodeURIComponent(e.id)}`, {method: "DELETE"});
          await showEndpoints();
        }));
        return h("tr", {dataset: {endpoint: e.id}},
          h("td", {}, h("a", {href: `#/webhooks/${encodeURIComponent(e.id)}`}, e.name || e.id), h("br", {}), h("code", {}, e.id)),
          h("td", {}, h("code", {}, e.url)), h("td", {}, e.event_types.map((t) => t.split(".").pop()).join(", ")),
          h("td", {}, endpointState(e)), h("td", {}, fmtTime(e.created_at)), h("td", {}, remove, rowErrors));
      })))));
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    act(button, errors, async () => {
      created.replaceChildren();
      const eventTypes = boxes.filter((box) => box.checked).map((box) => box.value);
      const endpoint = await api("/v1/webhook_endpoints", {method: "POST", json: {url: url.value, name: name.value, event_types: eventTypes}});
      created.replaceChildren(h("div", {class: "ok", role: "status"},
        h("p", {}, "Created ", h("code", {}, endpoint.id), ". Its signing secret, shown only now: copy it into your app."),
        h("p", {}, h("code", {id: "webhook-secret"}, endpoint.signing_secret))));
      form.querySelector("#webhook-url").value = "";
      await showEndpoints();
    });
  });
  await showEndpoints();
}

function attemptText(attempt) {
  const outcome = attempt.status_code !== null ? `HTTP ${attempt.status_code}` : attempt.error;
  return `${fmtTime(attempt.attempted_at)}: ${outcome} (${attempt.duration_ms} ms)`;
}

export async function webhookPage(current, endpointId) {
  setTitle("Webhook deliveries");
  const endpoint = await api(`/v1/webhook_endpoints/${encodeURIComponent(endpointId)}`);
  if (!current.alive) return;
  const log = h("div", {id: "deliveries", "aria-live": "polite"});
  const refresh = h("button", {type: "button", id: "deliveries-refresh"}, "Refresh");
  const errors = h("div", {});
  main.append(h("p", {}, h("a", {href: "#/webhooks"}, "All webhook endpoints")),
    h("h1", {}, `Deliveries to ${endpoint.name || endpoint.id}`),
    h("dl", {class: "facts"}, h("dt", {}, "URL"), h("dd", {}, h("code", {}, endpoint.url)),
      h("dt", {}, "State"), h("dd", {id: "endpoint-state"}, endpointState(endpoint)),
      h("dt", {}, "Secret"), h("dd", {}, h("code", {}, endpoint.signing_secret_hint))),
    refresh, errors, log);

  async function showDeliveries() {
    const page = await api(`/v1/webhook_endpoints/${encodeURIComponent(endpointId)}/deliveries?limit=50`);
    if (!current.alive) return;
    if (!page.data.length) { log.replaceChildren(h("p", {class: "empty"}, "No deliveries yet: one is made when a job of this project ends.")); return; }
    log.replaceChildren(h("div", {class: "table-wrap"}, h("table", {id: "deliveries-table"},
      h("thead", {}, h("tr", {}, ["Event", "Job", "Status", "Attempts", "webhook-id"].map((t) => h("th", {scope: "col"}, t)))),
      h("tbody", {}, page.data.map((d) => h("tr", {dataset: {delivery: d.id}},
        h("td", {}, d.event_type, h("br", {}), fmtTime(d.created_at)),
        h("td", {}, h("a", {href: `#/jobs/${encodeURIComponent(d.job_id)}`}, d.job_id)),
        h("td", {}, statusBadge(d.status), d.next_attempt_at ? ` next ${fmtTime(d.next_attempt_at)}` : ""),
        h("td", {}, h("ol", {class: "attempts"}, d.attempts.map((a) => h("li", {}, attemptText(a))))),
        h("td", {}, h("code", {}, d.id))))))));
  }

  refresh.addEventListener("click", () => act(refresh, errors, showDeliveries));
  const timer = setInterval(() => { showDeliveries().catch((err) => errors.replaceChildren(errorBox(err))); }, 3000);
  current.cleanups.push(() => clearInterval(timer));
  await showDeliveries();
}
