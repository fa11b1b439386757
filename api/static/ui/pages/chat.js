// #/chat: a conversation with a base or fine-tuned model through POST /v1/chat/completions.

import {api} from "../api.js";
import {act, h, main, routeParams, setTitle} from "../dom.js";

export async function chatPage(current) {
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
