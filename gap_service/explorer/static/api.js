// The gap.v1 API over HTTP/JSON transcoding (same origin as this page): JSON calls, the
// newline-delimited ExplainStream, errors with the server's message, the optional API key.

const KEY_STORAGE = "gap-explorer-api-key";

/** A failed call: the gRPC code (name and number), the HTTP status and the server's message. */
export class ApiError extends Error {
  constructor(message, { code = 2, status = 0, details = [] } = {}) {
    super(message);
    this.name = "ApiError";
    this.code = code;
    this.status = status;
    this.details = details;
  }

  get codeName() {
    return CODE_NAMES[this.code] || `code ${this.code}`;
  }

  /** google.rpc.BadRequest field violations: [{field, description}]. */
  get violations() {
    const out = [];
    for (const detail of this.details || []) {
      for (const v of detail.fieldViolations || []) out.push({ field: v.field || "", description: v.description || "" });
    }
    return out;
  }
}

const CODE_NAMES = ["OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
  "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED",
  "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"];

export function apiKey() {
  try { return sessionStorage.getItem(KEY_STORAGE) || ""; } catch { return ""; }
}

export function setApiKey(key) {
  try {
    if (key) sessionStorage.setItem(KEY_STORAGE, key); else sessionStorage.removeItem(KEY_STORAGE);
  } catch { /* storage disabled: the key lasts until the page closes */ }
}

function headers(json) {
  const h = { Accept: "application/json" };
  if (json) h["Content-Type"] = "application/json";
  const key = apiKey();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

/** Relative to the page, so the explorer also works behind a proxy that serves it under a prefix. */
export function url(path) {
  return new URL(path.replace(/^\//, ""), document.baseURI).toString();
}

async function errorOf(response) {
  const text = await response.text().catch(() => "");
  let body = null;
  try { body = JSON.parse(text); } catch { /* not JSON: a proxy's page */ }
  if (body && typeof body === "object" && (body.message !== undefined || body.code !== undefined)) {
    return new ApiError(body.message || `HTTP ${response.status}`, { code: body.code ?? 2, status: response.status, details: body.details || [] });
  }
  const brief = text.replace(/<[^>]*>/g, " ").replace(/\s+/g, " ").trim().slice(0, 300);
  return new ApiError(`HTTP ${response.status} ${response.statusText}${brief ? ": " + brief : ""}`, { status: response.status });
}

function networkError(error) {
  if (error && error.name === "AbortError") return error;
  return new ApiError(`the server cannot be reached (${error && error.message ? error.message : error})`, { code: 14 });
}

/** One call; resolves to {data, ms} (round trip in milliseconds). */
export async function call(method, path, body, { signal } = {}) {
  const started = performance.now();
  let response;
  try {
    response = await fetch(url(path), {
      method, signal, headers: headers(body !== undefined),
      body: body !== undefined ? JSON.stringify(body) : undefined,
    });
  } catch (error) {
    throw networkError(error);
  }
  if (!response.ok) throw await errorOf(response);
  const data = await response.json();
  return { data, ms: performance.now() - started };
}

/**
 * A server-streaming call: one `{"result": ...}` JSON object per line, and a last `{"error": ...}`
 * line on a mid-stream error. Calls onMessage(result) for each line as it arrives.
 */
export async function stream(path, body, onMessage, { signal } = {}) {
  const started = performance.now();
  let response;
  try {
    response = await fetch(url(path), { method: "POST", signal, headers: headers(true), body: JSON.stringify(body) });
  } catch (error) {
    throw networkError(error);
  }
  if (!response.ok) throw await errorOf(response);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  const handle = (line) => {
    if (!line.trim()) return;
    const message = JSON.parse(line);
    if (message.error) {
      const e = message.error;
      throw new ApiError(e.message || "the stream failed", { code: e.code ?? 2, status: response.status, details: e.details || [] });
    }
    onMessage(message.result !== undefined ? message.result : message);
  };
  for (;;) {
    let chunk;
    try {
      chunk = await reader.read();
    } catch (error) {
      throw networkError(error);
    }
    if (chunk.done) break;
    buffer += decoder.decode(chunk.value, { stream: true });
    let newline;
    while ((newline = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, newline);
      buffer = buffer.slice(newline + 1);
      handle(line);
    }
  }
  buffer += decoder.decode();
  handle(buffer);
  return { ms: performance.now() - started };
}

export const api = {
  listModels: () => call("GET", "/v1/models"),
  getModel: (model) => call("GET", `/v1/models/${encodeURIComponent(model)}`),
  predict: (model, request, opts) => call("POST", `/v1/models/${encodeURIComponent(model)}:predict`, request, opts),
  explain: (model, request, opts) => call("POST", `/v1/models/${encodeURIComponent(model)}:explain`, request, opts),
  explainStream: (model, request, onMessage, opts) =>
    stream(`/v1/models/${encodeURIComponent(model)}:explainStream`, { request }, onMessage, opts),
  expand: (model, request, path, opts) =>
    call("POST", `/v1/models/${encodeURIComponent(model)}:expand`, { request, path }, opts),
  getChannel: (model, layer, channel) =>
    call("GET", `/v1/models/${encodeURIComponent(model)}/channel?layer=${encodeURIComponent(layer)}&channel=${channel}&patches=true`),
  colormap: () => call("GET", "/colormap.json"),
};

// -- bytes <-> base64 (protobuf JSON carries bytes as base64) ----------------------------------
export function bytesToBase64(bytes) {
  let binary = "";
  const step = 0x8000;
  for (let i = 0; i < bytes.length; i += step) binary += String.fromCharCode.apply(null, bytes.subarray(i, i + step));
  return btoa(binary);
}

export function base64ToBytes(text) {
  // The JSON mapping accepts both alphabets; the URL-safe one is normalised here.
  const binary = atob(String(text || "").replace(/-/g, "+").replace(/_/g, "/"));
  const out = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) out[i] = binary.charCodeAt(i);
  return out;
}
