// Models: the node's store, placing a model (from the store or the hub) with a
// sharding and nodes, pulling one into the store with its progress, downloads in
// flight, and deleting an instance.

import { call, errorMessage, getJSON, lines } from "./api.js";
import { bytes, fill, h } from "./view.js";

export class ModelsPanel {
  constructor({ onError }) {
    this.onError = onError;
    this.form = document.getElementById("place-form");
    this.status = document.getElementById("place-status");
    this.form.addEventListener("submit", (e) => {
      e.preventDefault();
      this.place();
    });
    document.getElementById("pull").addEventListener("click", () => this.pull());
    this.nodeIds = [];
  }

  say(text, kind = "") {
    this.status.className = kind;
    this.status.textContent = text;
  }

  async refreshStore() {
    try {
      const tags = await getJSON("/api/tags");
      const names = tags.models.map((m) => m.name.replace(/:latest$/, ""));
      fill("model-names", names.map((n) => h("option", { value: n })));
      fill(
        "store",
        tags.models.length
          ? tags.models.map((m) =>
              h(
                "li",
                { "data-stored": m.name.replace(/:latest$/, "") },
                h("strong", { text: m.name.replace(/:latest$/, "") }),
                ` · ${bytes(m.size)}`,
                m.complete === false ? " · partial" : "",
              ),
            )
          : h("li.muted", { text: "The store is empty." }),
      );
    } catch (err) {
      this.onError(err);
    }
  }

  // The node checkboxes follow the cluster's nodes.
  render(state) {
    const ids = Object.keys(state.nodes).sort();
    if (ids.join() !== this.nodeIds.join()) {
      const checked = new Set(
        [...this.form.querySelectorAll("input[name=node]:checked")].map((i) => i.value),
      );
      this.nodeIds = ids;
      fill(
        "place-nodes",
        ids.map((id) =>
          h("label.check", {}, h("input", { type: "checkbox", name: "node", value: id, checked: checked.has(id) }), ` ${id}`),
        ),
      );
    }
    const downloads = Object.values(state.downloads || {});
    fill(
      "downloads",
      downloads.length
        ? downloads.map((d) =>
            h(
              "li",
              { "data-download": d.model },
              h("strong", { text: d.model }),
              ` ${d.state} `,
              d.total ? h("progress", { max: d.total, value: d.completed }) : null,
              d.total ? ` ${bytes(d.completed)} of ${bytes(d.total)}` : "",
              d.error ? h("span.error-text", { text: ` ${d.error}` }) : null,
            ),
          )
        : h("li.muted", { text: "No download in flight." }),
    );
  }

  request() {
    const data = new FormData(this.form);
    const body = { model: String(data.get("model") || "").trim(), sharding: data.get("sharding") };
    const nodes = data.getAll("node");
    if (nodes.length) body.nodes = nodes;
    const min = Number(data.get("min_nodes"));
    if (min > 1) body.min_nodes = min;
    return body;
  }

  async place() {
    const body = this.request();
    if (!body.model) return this.say("Name a model first.", "error-text");
    this.say(`placing ${body.model}…`);
    try {
      const answer = await getJSON("/v1/instances", { method: "POST", body });
      this.say(`${answer.status}: instance ${answer.id} (its progress shows in the cluster view)`, "ok-text");
    } catch (err) {
      this.say(`Cannot place ${body.model}: ${err.message}`, "error-text");
      if (err.status === 401) this.onError(err);
    }
  }

  // Ollama's pull, read as NDJSON progress lines.
  async pull() {
    const model = this.request().model;
    if (!model) return this.say("Name a model first.", "error-text");
    this.say(`pulling ${model}…`);
    try {
      const response = await call("/api/pull", { method: "POST", body: { model, stream: true } });
      let last = null;
      for await (const line of lines(response)) {
        if (!line.trim()) continue;
        const step = JSON.parse(line);
        if (step.error) throw new Error(errorMessage(step));
        last = step;
        const amount = step.total ? ` ${bytes(step.completed || 0)} of ${bytes(step.total)}` : "";
        this.say(`${model}: ${step.status}${amount}`);
      }
      if (last && last.status === "success") this.say(`${model} is in the store.`, "ok-text");
      this.refreshStore();
    } catch (err) {
      this.say(`Cannot pull ${model}: ${err.message}`, "error-text");
    }
  }

  async remove(instance) {
    if (!window.confirm(`Delete instance ${instance.id} (${instance.model})?`)) return;
    try {
      await call(`/v1/instances/${encodeURIComponent(instance.id)}`, { method: "DELETE" });
      this.say(`deleted ${instance.id}`, "ok-text");
    } catch (err) {
      this.say(`Cannot delete ${instance.id}: ${err.message}`, "error-text");
    }
  }
}
