// The dashboard's entry point: wires the live cluster state to the panels, and
// asks for the API key when the node refuses the one it has (or none).

import { apiKey, setApiKey } from "./api.js";
import { ChatPanel } from "./chat.js";
import { renderCluster } from "./cluster.js";
import { LiveState } from "./live.js";
import { renderMetrics } from "./metrics.js";
import { ModelsPanel } from "./models.js";

const banner = document.getElementById("error");
const keyForm = document.getElementById("key-form");
const status = document.getElementById("connection");

function showError(text) {
  banner.textContent = text;
  banner.hidden = false;
}

function onError(err) {
  if (err.status === 401) {
    showError(
      apiKey()
        ? `The node refused this API key: ${err.message}`
        : `This node needs an API key: ${err.message}`,
    );
    keyForm.hidden = false;
    document.getElementById("key-input").focus();
  } else {
    showError(err.message);
  }
}

const models = new ModelsPanel({ onError });
const chat = new ChatPanel({ onError });

let pending = false;
function render(state) {
  if (pending || !state) return;
  pending = true;
  requestAnimationFrame(() => {
    pending = false;
    renderCluster(state, { onDelete: (instance) => models.remove(instance) });
    renderMetrics(state);
    models.render(state);
    chat.render(state);
  });
}

const live = new LiveState({
  onChange: render,
  onStatus: (kind, text) => {
    status.dataset.state = kind;
    status.textContent = text;
    if (kind === "live") banner.hidden = true;
  },
  onError,
});

function connect() {
  live.start();
  models.refreshStore();
}

keyForm.addEventListener("submit", (e) => {
  e.preventDefault();
  setApiKey(document.getElementById("key-input").value.trim());
  document.getElementById("key-input").value = "";
  keyForm.hidden = true;
  banner.hidden = true;
  connect();
});

document.getElementById("forget-key").addEventListener("click", () => {
  setApiKey("");
  keyForm.hidden = false;
});

connect();
