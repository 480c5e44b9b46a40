// Live metrics: this node's own (its Prometheus registry, sampled by the event
// stream every second) and each instance's, as the cluster's view reports them.

import { fill, h } from "./view.js";

function figure(name, label, value) {
  return h("div.figure", { "data-metric": name }, h("dt", { text: label }), h("dd", { text: String(value) }));
}

export function renderMetrics(state) {
  const m = state.metrics || {};
  fill(
    "node-metrics",
    figure("in_flight", "requests in flight", m.in_flight ?? 0),
    figure("queue_depth", "queue depth", m.queue_depth ?? 0),
    figure("open_streams", "open streams", m.open_streams ?? 0),
    figure("runner_active", "runner's active requests", m.runner_active ?? 0),
  );
  const models = Object.entries(m.models || {});
  const instances = Object.values(state.instances);
  const rows = [
    ...instances.map((i) => {
      const entry = i.shards.find((s) => s.rank === 0) || {};
      return h(
        "tr",
        { "data-instance-metrics": i.id },
        h("td", { text: `${i.model}` }),
        h("td.small", { text: i.id }),
        h("td.num", { text: (i.tokens_per_second ?? 0).toFixed(1) }),
        h("td.num", { text: String(entry.active_requests ?? 0) }),
      );
    }),
  ];
  fill(
    "instance-metrics",
    rows.length ? rows : h("tr", {}, h("td.muted", { colspan: 4, text: "no instance" })),
  );
  fill(
    "model-metrics",
    models.length
      ? models.map(([model, v]) =>
          h(
            "tr",
            { "data-model-metrics": model },
            h("td", { text: model }),
            h("td.num", { text: v.tokens_per_second.toFixed(1) }),
            h("td.num", { text: String(v.generated_tokens) }),
          ),
        )
      : h("tr", {}, h("td.muted", { colspan: 3, text: "nothing generated through this node yet" })),
  );
}
