// #/signin: the API key, checked with GET /v1/models before it is kept.

import {api, signIn} from "../api.js";
import {act, h, main, oneFieldForm, setTitle} from "../dom.js";

export async function signInPage() {
  setTitle("Sign in");
  const errors = h("div", {});
  const input = h("input", {id: "api-key", name: "api-key", type: "password", autocomplete: "off", required: true,
                            "aria-describedby": "api-key-help", spellcheck: "false"});
  const button = h("button", {type: "submit", id: "sign-in"}, "Sign in");
  const form = oneFieldForm({id: "sign-in-form", cls: "card narrow", title: "Sign in", label: "API key", input, help: [
    "A key from QLORA_API_KEYS, or the one `make run` printed ($QLORA_HOME/api_key). It is kept in this browser tab ",
    "only (sessionStorage) and sent as the Authorization header of each request."]}, button, errors);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    act(button, errors, async () => {
      const key = input.value.trim();
      await api("/v1/models", {key}); // a key the API refuses is answered here with its 401 envelope
      signIn(key);
      const next = sessionStorage.getItem("qlora.next");
      sessionStorage.removeItem("qlora.next");
      location.hash = next && next !== "#/signin" ? next : "#/jobs";
    });
  });
  main.append(form);
}
