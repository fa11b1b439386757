// #/upload: a JSONL file validated by the API as it is stored; a file with faults lists each faulty line.

import {api} from "../api.js";
import {fmtBytes, fmtTime} from "../format.js";
import {act, h, main, oneFieldForm, setTitle, statusBadge} from "../dom.js";

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

export async function uploadPage(current) {
  setTitle("Upload");
  const errors = h("div", {});
  const result = h("div", {id: "upload-result", "aria-live": "polite"});
  const input = h("input", {id: "upload-file", name: "file", type: "file", accept: ".jsonl,.json,.txt,application/jsonl", required: true,
                            "aria-describedby": "upload-help"});
  const button = h("button", {type: "submit", id: "upload-button"}, "Upload and validate");
  const form = oneFieldForm({id: "upload-form", cls: "card", title: "Upload training data", label: "JSONL file", input, help: [
    "One chat example a line: {\"messages\": [{\"role\": \"user\", ...}, {\"role\": \"assistant\", ...}]}. ",
    "The API validates every line as it stores the file and names the lines at fault (docs/training.md)."]}, button, errors, result);
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
