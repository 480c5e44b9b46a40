// The chat: a loaded model, a conversation kept in the page (multi-turn), tokens
// streamed from /v1/chat/completions, Stop through /v1/cancel/{id}, and for each
// answer its time to first token and tokens per second.

import { call, errorMessage, serverEvents } from "./api.js";
import { fill, h } from "./view.js";

function newId() {
  const random = window.crypto && crypto.randomUUID ? crypto.randomUUID() : `${Date.now()}-${Math.random().toString(16).slice(2)}`;
  return `dash-${random}`;
}

export class ChatPanel {
  constructor({ onError }) {
    this.onError = onError;
    this.history = []; // {role, content}: what is sent with the next message
    this.running = null; // {id, controller} while an answer streams
    this.form = document.getElementById("chat-form");
    this.input = document.getElementById("chat-input");
    this.select = document.getElementById("chat-model");
    this.stopButton = document.getElementById("stop");
    this.sendButton = document.getElementById("send");
    this.form.addEventListener("submit", (e) => {
      e.preventDefault();
      this.send();
    });
    this.input.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey) {
        e.preventDefault();
        this.send();
      }
    });
    this.stopButton.addEventListener("click", () => this.stop());
    document.getElementById("chat-clear").addEventListener("click", () => this.clear());
  }

  // The models with a ready instance, as the cluster view says.
  render(state) {
    const ready = [...new Set(Object.values(state.instances).filter((i) => i.state === "ready").map((i) => i.model))].sort();
    const current = this.select.value;
    const shown = [...this.select.options].map((o) => o.value);
    if (ready.join() !== shown.join()) {
      fill("chat-model", ready.length ? ready.map((m) => h("option", { value: m, text: m })) : h("option", { value: "", text: "no model loaded" }));
      if (ready.includes(current)) this.select.value = current;
    }
    this.sendButton.disabled = !ready.length || this.running !== null;
  }

  clear() {
    if (this.running) this.stop();
    this.history = [];
    fill("messages");
  }

  turn(role, text) {
    const body = h("div.text", { text });
    const item = h(`li.turn.${role}`, {}, h("span.role", { text: role === "user" ? "you" : this.select.value }), body);
    document.getElementById("messages").append(item);
    item.scrollIntoView({ block: "end" });
    return { item, body };
  }

  async send() {
    const text = this.input.value.trim();
    const model = this.select.value;
    if (!text || !model || this.running) return;
    this.input.value = "";
    this.turn("user", text);
    const messages = [...this.history, { role: "user", content: text }];
    const answer = this.turn("assistant", "");
    answer.item.dataset.state = "streaming";
    const id = newId();
    const controller = new AbortController();
    this.running = { id, controller };
    this.stopButton.disabled = false;
    this.sendButton.disabled = true;
    const maxTokens = Number(document.getElementById("max-tokens").value) || 256;
    const started = performance.now();
    let first = null;
    let reply = "";
    let tokens = 0;
    let usage = null;
    let outcome = "done";
    let error = null;
    try {
      const response = await call("/v1/chat/completions", {
        method: "POST",
        signal: controller.signal,
        extraHeaders: { "X-Request-Id": id },
        body: { model, messages, stream: true, max_tokens: maxTokens, stream_options: { include_usage: true } },
      });
      for await (const event of serverEvents(response)) {
        if (event.data === "[DONE]") break;
        const chunk = JSON.parse(event.data);
        if (chunk.error) {
          outcome = chunk.error.code === "cancelled" ? "stopped" : "error";
          error = errorMessage(chunk);
          break;
        }
        if (chunk.usage) usage = chunk.usage;
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.content) {
          if (first === null) first = performance.now();
          tokens += 1;
          reply += delta.content;
          answer.body.textContent = reply;
          const list = answer.item.parentElement;
          if (list.scrollHeight - list.scrollTop - list.clientHeight < 80) list.scrollTop = list.scrollHeight;
        }
      }
    } catch (err) {
      outcome = err.name === "AbortError" ? "stopped" : "error";
      error = err.message;
      if (err.status === 401) this.onError(err);
    }
    const ended = performance.now();
    const count = usage ? usage.completion_tokens : tokens;
    const stats = [];
    if (first !== null) stats.push(`first token ${Math.round(first - started)} ms`);
    if (first !== null && count > 1 && ended > first) stats.push(`${((count - 1) / ((ended - first) / 1000)).toFixed(1)} tokens/s`);
    stats.push(`${count} token${count === 1 ? "" : "s"}`);
    if (outcome === "stopped") stats.push("stopped");
    answer.item.dataset.state = outcome;
    answer.item.dataset.tokens = String(count);
    answer.item.append(h("p.stats", { text: stats.join(" · ") }));
    if (outcome === "error") answer.item.append(h("p.error-text", { role: "alert", text: `The node ended the answer with an error: ${error}` }));
    if (outcome !== "error" && reply) {
      this.history = [...messages, { role: "assistant", content: reply }];
    } else if (outcome !== "error") {
      this.history = messages;
    }
    this.running = null;
    this.stopButton.disabled = true;
    this.sendButton.disabled = !this.select.value;
  }

  // Cancel through the node (any node of the cluster finds the request by its
  // X-Request-Id); the stream then ends with its error event, shown as "stopped".
  async stop() {
    const running = this.running;
    if (!running) return;
    this.stopButton.disabled = true;
    try {
      await call(`/v1/cancel/${encodeURIComponent(running.id)}`, { method: "POST" });
    } catch (err) {
      // Not in flight any more (404), or the node is gone: close our side instead.
      running.controller.abort();
    }
  }
}
