// The cluster as the node sees it, kept live from its event stream (GET /v1/events):
// one snapshot, then changes ({op, id, value}) applied to it. On a cut stream it
// reconnects and starts again from a new snapshot.

import { ApiError, call, serverEvents } from "./api.js";

const SECTIONS = { node: "nodes", link: "links", instance: "instances", download: "downloads" };
const WHOLE = { cluster: "cluster", metrics: "metrics" };

export class LiveState {
  constructor({ onChange, onStatus, onError }) {
    this.state = null;
    this.onChange = onChange; // (state) after every batch of events
    this.onStatus = onStatus; // ("live" | "connecting" | "lost", text)
    this.onError = onError; // (ApiError): the stream was refused (401, 404...)
    this.controller = null;
  }

  start() {
    this.stop();
    this.controller = new AbortController();
    this.run(this.controller.signal);
  }

  stop() {
    if (this.controller) this.controller.abort();
    this.controller = null;
  }

  apply(event) {
    const body = JSON.parse(event.data);
    if (event.event === "snapshot") {
      this.state = body;
      return;
    }
    if (!this.state) return;
    if (event.event in WHOLE) {
      this.state[WHOLE[event.event]] = body.value;
      return;
    }
    const section = SECTIONS[event.event];
    if (!section) return; // an event kind this page does not know: ignore it
    const items = (this.state[section] ||= {});
    if (body.op === "removed") delete items[body.id];
    else items[body.id] = body.value;
  }

  async run(signal) {
    let delay = 500;
    while (!signal.aborted) {
      this.onStatus("connecting", "connecting…");
      try {
        const response = await call("/v1/events", {
          signal,
          extraHeaders: { Accept: "text/event-stream" },
        });
        delay = 500;
        for await (const event of serverEvents(response)) {
          this.apply(event);
          if (event.event === "snapshot") this.onStatus("live", "live");
          this.onChange(this.state);
        }
        this.onStatus("lost", "stream ended; reconnecting…");
      } catch (err) {
        if (signal.aborted) return;
        if (err instanceof ApiError && err.status >= 400 && err.status < 500) {
          this.onError(err);
          this.onStatus("lost", "not connected");
          return; // the page asks for a key (401), or the node has no cluster (404)
        }
        this.onStatus("lost", `${err.message}; reconnecting…`);
      }
      await new Promise((resolve) => setTimeout(resolve, delay));
      delay = Math.min(delay * 2, 5000);
    }
  }
}
