// The cluster view: nodes (memory, addresses, runners), the links between them,
// and the instances with how each model is split across the nodes.

import { bytes, fill, h, linkKind } from "./view.js";

function nodeCard(node, cluster) {
  const used = node.memory_used;
  const total = node.memory_total;
  const badges = [
    node.leader ? h("span.badge.leader", { text: `leader · term ${cluster.term}` }) : null,
    node.self ? h("span.badge", { text: "this node" }) : null,
  ];
  const memory = total
    ? [
        h("meter", { min: 0, max: total, value: used, title: "memory used" }),
        ` ${bytes(used)} used of ${bytes(total)}, ${bytes(node.memory_free)} free`,
      ]
    : [`${bytes(node.memory_free)} free`];
  const addresses = node.addresses.length
    ? node.addresses.map((a) => `${a.host} (${linkKind(a.kind)}${a.interface ? `, ${a.interface}` : ""})`)
    : [node.host];
  const runners = node.runners.map((r) =>
    h(
      "li",
      { "data-runner": `${r.instance_id}/${r.rank}`, "data-state": r.state },
      h(`span.state.${r.state}`, { text: r.state }),
      ` rank ${r.rank} of ${r.instance_id}`,
      r.active_requests ? ` · ${r.active_requests} active` : "",
      r.error ? h("span.error-text", { text: ` · ${r.error}` }) : null,
    ),
  );
  return h(
    "article.card.node",
    { "data-node": node.id },
    h("h3", {}, h("span.name", { text: node.id }), ...badges),
    h("p.small", { text: addresses.join(" · ") }),
    h("p.memory", {}, ...memory),
    runners.length ? h("ul.runners", {}, runners) : h("p.small.muted", { text: "no runner" }),
  );
}

function linkRow(link) {
  return h(
    "tr",
    { "data-link": `${link.a}|${link.b}`, "data-up": link.up ? "yes" : "no" },
    h("td", { text: `${link.a} ↔ ${link.b}` }),
    h("td", {}, h(`span.state.${link.up ? "ready" : "failed"}`, { text: link.up ? "up" : "down" })),
    h("td", { text: link.up ? linkKind(link.kind) : "" }),
    h("td.num", { text: link.rtt_ms === null ? "" : `${link.rtt_ms.toFixed(1)} ms` }),
    h("td.small", { text: link.host || "" }),
  );
}

function layers(shard) {
  return `layers ${shard.start_layer}–${shard.end_layer - 1}`;
}

function instanceCard(instance, onDelete) {
  const total = instance.shards.reduce((n, s) => n + (s.end_layer - s.start_layer), 0) || 1;
  const split = instance.shards.map((s) =>
    h(
      `div.shard.${s.runner || "none"}`,
      {
        "data-shard": `${s.node_id}`,
        style: { flexGrow: instance.sharding === "tensor" ? 1 : (s.end_layer - s.start_layer) / total },
        title: `rank ${s.rank} on ${s.node_id}: ${layers(s)}, runner ${s.runner || "not reported"}`,
      },
      h("strong", { text: s.node_id }),
      h("span", { text: ` ${layers(s)}` }),
      h("span.small", { text: ` · ${s.runner || "…"}${s.active_requests ? ` · ${s.active_requests} active` : ""}` }),
    ),
  );
  const download = instance.download;
  const progress =
    download && download.total
      ? h(
          "p.small",
          {},
          "downloading ",
          h("progress", { max: download.total, value: download.completed }),
          ` ${bytes(download.completed)} of ${bytes(download.total)}`,
        )
      : null;
  return h(
    "article.card.instance",
    { "data-instance": instance.id, "data-state": instance.state },
    h(
      "h3",
      {},
      h("span.name", { text: instance.model }),
      h(`span.state.${instance.state}`, { text: instance.state }),
    ),
    h(
      "p.small",
      {},
      `${instance.id} · ${instance.sharding} across ${instance.shards.length} node${instance.shards.length > 1 ? "s" : ""}`,
      instance.auto ? " · placed automatically" : "",
      instance.tokens_per_second ? ` · ${instance.tokens_per_second.toFixed(1)} tokens/s` : "",
    ),
    h("div.split", { role: "img", "aria-label": `split: ${instance.shards.map((s) => `${s.node_id} ${layers(s)}`).join(", ")}` }, split),
    progress,
    instance.error ? h("p.error-text", { text: instance.error }) : null,
    h("button.small", { type: "button", onclick: () => onDelete(instance) }, "Delete instance"),
  );
}

export function renderCluster(state, { onDelete }) {
  const cluster = state.cluster;
  const nodes = Object.values(state.nodes).sort((a, b) => a.id.localeCompare(b.id));
  const links = Object.values(state.links).sort((a, b) => `${a.a}|${a.b}`.localeCompare(`${b.a}|${b.b}`));
  const instances = Object.values(state.instances).sort((a, b) => a.id.localeCompare(b.id));
  fill(
    "cluster-summary",
    `${nodes.length} node${nodes.length === 1 ? "" : "s"} · leader ${cluster.leader || "none yet"} · term ${cluster.term} · seen from ${cluster.node_id}`,
  );
  fill("nodes", nodes.map((n) => nodeCard(n, cluster)));
  fill(
    "links",
    links.length
      ? links.map(linkRow)
      : h("tr", {}, h("td.muted", { colspan: 5, text: "no links: a single node" })),
  );
  fill(
    "instances",
    instances.length
      ? instances.map((i) => instanceCard(i, onDelete))
      : h("p.muted", { text: "No instance. Place a model below." }),
  );
}
