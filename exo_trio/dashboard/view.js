// Small helpers to build DOM nodes and format figures.

// h("tag.class", {attr: value}, ...children): an element; strings become text.
export function h(spec, attrs = {}, ...children) {
  const [tag, ...classes] = spec.split(".");
  const el = document.createElement(tag);
  if (classes.length) el.className = classes.join(" ");
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "text") el.textContent = value;
    else if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name === "style" && typeof value === "object") Object.assign(el.style, value);
    else el.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function bytes(n) {
  if (n === null || n === undefined) return "?";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return `${n.toFixed(i >= 3 ? 1 : 0)} ${units[i]}`;
}

export function linkKind(kind) {
  const names = {
    thunderbolt: "Thunderbolt",
    "link-local": "link-local",
    private: "LAN",
    public: "WAN",
    loopback: "loopback",
  };
  return names[kind] || kind || "?";
}

// Replace the children of the element with id `id`.
export function fill(id, ...children) {
  document.getElementById(id).replaceChildren(...children.flat());
}
