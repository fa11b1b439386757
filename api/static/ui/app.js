// The QLoRA dashboard: a small hash-routed page over the public REST API (docs/dashboard.md). This module wires
// the pages to their routes and the page's fixed controls; each page is a module under pages/.

import {forgetKey} from "./api.js";
import {main} from "./dom.js";
import {route, startRouter} from "./router.js";
import {chatPage} from "./pages/chat.js";
import {jobPage} from "./pages/job.js";
import {jobsPage} from "./pages/jobs.js";
import {newJobPage} from "./pages/new-job.js";
import {signInPage} from "./pages/signin.js";
import {uploadPage} from "./pages/upload.js";
import {webhookPage, webhooksPage} from "./pages/webhooks.js";

function signOut() {
  forgetKey();
  sessionStorage.removeItem("qlora.next");
  if (location.hash === "#/signin") route();
  else location.hash = "#/signin"; // the hashchange renders the page
}

document.getElementById("sign-out").addEventListener("click", signOut);
document.getElementById("skip-link").addEventListener("click", (event) => { event.preventDefault(); main.focus(); });
// A link to the page already shown renders it afresh (a new empty form), as a hash change would.
document.getElementById("nav").addEventListener("click", (event) => {
  const link = event.target.closest("a");
  if (link && link.getAttribute("href") === location.hash) route();
});
startRouter([
  [/^#\/signin$/, signInPage],
  [/^#\/jobs\/([^/?]+)$/, jobPage],
  [/^#\/jobs$/, jobsPage],
  [/^#\/upload$/, uploadPage],
  [/^#\/new$/, newJobPage],
  [/^#\/chat$/, chatPage],
  [/^#\/webhooks\/([^/?]+)$/, webhookPage],
  [/^#\/webhooks$/, webhooksPage],
]);
