// Talking to the node: the API key, JSON calls, and server-sent event streams.
//
// The key is asked for once (when the node answers 401) and kept in the
// browser's localStorage; every call sends it as a Bearer token. Streams are read
// with fetch (EventSource cannot send an Authorization header).

const KEY = "exo-trio.api-key";

export class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export function apiKey() {
  return localStorage.getItem(KEY) || "";
}

export function setApiKey(key) {
  if (key) localStorage.setItem(KEY, key);
  else localStorage.removeItem(KEY);
}

function headers(extra = {}) {
  const key = apiKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

// The message of an error body in any of the node's dialects.
export function errorMessage(body) {
  if (!body) return "";
  if (typeof body.error === "string") return body.error;
  if (body.error && body.error.message) return body.error.message;
  return body.message || "";
}

async function failure(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON: the status line says enough
  }
  const code = body && body.error && body.error.code;
  const text = errorMessage(body) || `${response.status} ${response.statusText}`;
  return new ApiError(response.status, text, code);
}

// fetch, with the key; a non-2xx answer throws ApiError with the node's message.
export async function call(path, { method = "GET", body, signal, extraHeaders } = {}) {
  const init = { method, signal, headers: headers(extraHeaders) };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, `The node cannot be reached (${err.message}).`, "unreachable");
  }
  if (!response.ok) throw await failure(response);
  return response;
}

export async function getJSON(path, options) {
  return (await call(path, options)).json();
}

// Yield the lines of a streamed response body as they arrive.
export async function* lines(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n")) >= 0) {
      yield buffer.slice(0, end).replace(/\r$/, "");
      buffer = buffer.slice(end + 1);
    }
  }
  if (buffer) yield buffer;
}

// Yield {event, data, id} for each server-sent event of a response.
export async function* serverEvents(response) {
  let event = "message";
  let data = [];
  let id = null;
  for await (const line of lines(response)) {
    if (line === "") {
      if (data.length) yield { event, data: data.join("\n"), id };
      event = "message";
      data = [];
      continue;
    }
    if (line.startsWith(":")) continue; // a keep-alive comment
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") event = value;
    else if (field === "data") data.push(value);
    else if (field === "id") id = value;
  }
  if (data.length) yield { event, data: data.join("\n"), id };
}
