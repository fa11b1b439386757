// #/new: the create-job form, one field per hyperparameter of the service's own OpenAPI document.

import {api, listAll} from "../api.js";
import {act, h, main, routeParams, setTitle} from "../dom.js";

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
// Method dpo's options (OpenAI's beta, then the engine's loss variants): shown, and sent, only when dpo is picked;
// a supervised job that names one is refused.
const DPO_KEYS = ["beta", "loss_type", "simpo_gamma", "rpo_alpha"];

export async function newJobPage(current) {
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
    methods.enum.map((m) => h("option", {value: m, selected: m === params.get("method")}, m)));

  const props = hyper.properties || {};
  const openaiFields = OPENAI_KEYS.filter((k) => props[k]).map((k) => hyperInput(k, props[k]));
  const dpoFields = h("fieldset", {id: "dpo-options"}, h("legend", {}, "Preference tuning (dpo)"),
    h("p", {class: "help"}, "The training file holds preference pairs (input, preferred_output, non_preferred_output)."),
    DPO_KEYS.filter((k) => props[k]).map((k) => hyperInput(k, props[k])));
  const showMethodOptions = () => { dpoFields.hidden = methodSelect.value !== "dpo"; };
  methodSelect.addEventListener("change", showMethodOptions);
  showMethodOptions();
  const engineNames = Object.keys(props).filter((k) => !OPENAI_KEYS.includes(k) && !DPO_KEYS.includes(k));
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
    dpoFields,
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
        if (el.closest("[hidden]")) continue; // another method's options
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
