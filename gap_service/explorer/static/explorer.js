// gap-service explorer: pick a model, an image and a decision; the tree of evidence streams in
// level by level (ExplainStream) and any node is decomposed further on demand (Expand). Talks to
// the gap.v1 API through its HTTP/JSON transcoding on the page's own origin (docs/explorer.md).

import { api, ApiError, apiKey, setApiKey, bytesToBase64, base64ToBytes } from "./api.js";
import { setColormap, drawLegend, pictureUrl, greyUrl, heatmapOverlay, camOverlay, isEmpty } from "./maps.js";
import { TreeView, formatNumber, formatShare } from "./tree.js";
import { ImageInput, inputSize } from "./input.js";

const EXAMPLES = [
  { file: "static/examples/chelsea.jpg", name: "chelsea.jpg", title: "Chelsea the cat (scikit-image, CC0, Stefan van der Walt)" },
  { file: "static/examples/coffee.jpg", name: "coffee.jpg", title: "A cup of coffee (scikit-image, CC0, Rachel Michetti)" },
  { file: "static/examples/astronaut.jpg", name: "astronaut.jpg", title: "Astronaut Eileen Collins (scikit-image, NASA, public domain)" },
  { file: "static/examples/page.png", name: "page.png", title: "A rendered document page (gap_service/examples.py)" },
];
const OUTPUT = { heatmaps: true, cams: true, picture: true, omitMaps: true };
const CAM_TITLES = { gradcam: "Grad-CAM", layercam: "LayerCAM" };
const PREDICT_TOP_K = 5;

const $ = (id) => document.getElementById(id);

const state = {
  models: [],
  model: null, // name
  info: null, // GetModelResponse
  image: null, // {bytes, base64, name}
  prediction: null,
  target: null, // gap.v1 Target JSON, or null: the model's task default
  run: null, // the explanation on display: {gen, request, header, summary, controller, urls}
  gen: 0,
  predictController: null,
  predicted: null, // "model|image serial" of the prediction asked for
  channels: new Map(), // "model|layer|channel" -> Promise<GetChannelResponse>
  layerMisses: new Map(), // "model|layer" -> ApiError (no atlas, or a layer it does not cover)
  timings: new Map(),
  mapShape: null, // a dense output's [H, W], learnt from an explanation of a region
  detailsNode: null,
};

// -- small helpers -------------------------------------------------------------------------------
function el(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined) e.textContent = text;
  return e;
}

function labelOf(index) {
  const labels = (state.info && state.info.labels) || [];
  return labels[index] || "";
}

function shortLabel(label) {
  return (label || "").split(",")[0];
}

function timing(kind, engineSeconds, ms) {
  state.timings.set(kind, { engine: engineSeconds, ms });
  const box = $("timings");
  box.replaceChildren();
  for (const [name, t] of state.timings) {
    const span = el("span", "timing");
    const engine = t.engine !== undefined && t.engine !== null ? `${Number(t.engine).toFixed(2)} s engine, ` : "";
    span.textContent = `${name} ${engine}${(t.ms / 1000).toFixed(2)} s round trip`;
    box.append(span);
  }
}

function clearError() {
  $("error").hidden = true;
}

function showError(error, context) {
  if (error && error.name === "AbortError") return;
  const apiError = error instanceof ApiError ? error : null;
  $("error-title").textContent = apiError ? `${context}: ${apiError.codeName}` : `${context}:`;
  $("error-message").textContent = error && error.message ? error.message : String(error);
  const list = $("error-details");
  list.replaceChildren();
  for (const v of apiError ? apiError.violations : []) {
    const item = el("li");
    item.append(el("code", "", v.field), document.createTextNode(` ${v.description}`));
    list.append(item);
  }
  list.hidden = !list.children.length;
  $("error").hidden = false;
}

function guard(context, fn) {
  return (...args) => Promise.resolve().then(() => fn(...args)).catch((error) => showError(error, context));
}

function download(name, blob) {
  const href = URL.createObjectURL(blob);
  const a = el("a");
  a.href = href;
  a.download = name;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(href), 10000);
}

function slug(text) {
  return String(text || "").toLowerCase().replace(/[^a-z0-9]+/g, "-").replace(/^-|-$/g, "").slice(0, 40) || "explanation";
}

// -- settings ------------------------------------------------------------------------------------
function settings() {
  const int = (id, fallback) => {
    const input = $(id);
    const v = Math.round(Number(input.value));
    const min = Number(input.min || 1);
    const max = Number(input.max || 64);
    return Number.isFinite(v) ? Math.min(Math.max(v, min), max) : fallback;
  };
  return { topK: int("top-k", 4), depth: int("depth", 2), score: $("score").value };
}

function explainRequest() {
  const s = settings();
  const options = { topK: s.topK, depth: s.depth };
  if (s.score !== "SCORE_MODE_NET") options.score = s.score;
  if (state.target) options.target = state.target;
  return { model: state.model, input: { image: state.image.base64 }, options, output: { ...OUTPUT } };
}

// -- models --------------------------------------------------------------------------------------
async function loadModels() {
  const { data } = await api.listModels();
  state.models = data.models || [];
  const select = $("model");
  select.replaceChildren();
  const unavailable = [];
  for (const m of state.models) {
    const ready = m.state !== "MODEL_STATE_UNAVAILABLE";
    const option = el("option", "", ready ? m.name : `${m.name} (unavailable)`);
    option.value = m.name;
    option.disabled = !ready;
    option.title = ready ? m.description || "" : m.reason || "unavailable";
    select.append(option);
    if (!ready) unavailable.push(m);
  }
  const note = $("unavailable");
  note.replaceChildren();
  if (unavailable.length) {
    const details = el("details");
    details.append(el("summary", "", `${unavailable.length} model${unavailable.length > 1 ? "s" : ""} unavailable: ${unavailable.map((m) => m.name).join(", ")}`));
    for (const m of unavailable) {
      const p = el("p", "reason");
      p.append(el("b", "", m.name), document.createTextNode(`: ${m.reason || "no reason given"}`));
      details.append(p);
    }
    note.append(details);
  }
  note.hidden = !unavailable.length;
  const ready = state.models.filter((m) => m.state !== "MODEL_STATE_UNAVAILABLE");
  if (!ready.length) {
    select.disabled = true;
    $("model-facts").textContent = state.models.length ? "no model is available" : "the server serves no model";
    return;
  }
  select.disabled = false;
  const wanted = new URLSearchParams(location.hash.slice(1)).get("model");
  const initial = ready.find((m) => m.name === wanted) || ready[0];
  select.value = initial.name;
  await selectModel(initial.name);
}

async function selectModel(name) {
  clearError();
  state.model = name;
  state.info = null;
  history.replaceState(null, "", `#model=${encodeURIComponent(name)}`);
  const { data } = await api.getModel(name);
  if (state.model !== name) return;
  state.info = data;
  state.mapShape = null;
  const summary = data.model || {};
  const task = (data.task || {}).kind || "no declared task";
  const [h, w] = inputSize(data);
  const facts = [task, `${Number(summary.numClasses || 0)} classes`, `input ${w}\u00d7${h}`, ...(summary.providers || []).map((p) => p.replace("ExecutionProvider", ""))];
  if (summary.state === "MODEL_STATE_UNAVAILABLE") facts.unshift("unavailable");
  $("model-facts").textContent = facts.join(" \u00b7 ");
  $("model-facts").title = summary.description || "";
  const limits = data.limits || {};
  if (limits.maxTopK) $("top-k").max = String(limits.maxTopK);
  if ((data.layers || []).length) $("depth").max = String(data.layers.length);
  const dense = (data.task || {}).kind === "dense";
  $("region-hint").hidden = !dense;
  $("region-channel").value = String((data.task || {}).channel || 0);
  tree.setLayers((data.layers || []).map((l) => l.name));
  input.setModel(data);
  input.setRegionMode(dense);
  resetPrediction();
  resetExplanation();
  if (state.image) await predict();
}

// -- image and prediction ------------------------------------------------------------------------
async function setImage(bytes, name) {
  clearError();
  state.image = { bytes, base64: bytesToBase64(bytes), name, serial: (state.image ? state.image.serial : 0) + 1 };
  state.target = null;
  resetPrediction();
  resetExplanation();
  await input.show(bytes, name);
  await predict();
}

function resetPrediction() {
  if (state.predictController) state.predictController.abort();
  state.predicted = null;
  state.prediction = null;
  $("classes").replaceChildren();
  $("detections").replaceChildren();
  $("predict-empty").hidden = false;
  $("predict-empty").textContent = state.image ? "Predicting\u2026" : "Choose an image to see what the model predicts.";
  input.setDetections([], null);
}

async function predict() {
  if (!state.image || !state.model || !state.info) return; // selectModel predicts once the model is described
  // Once per (model, image): an image chosen while the model is still being described is
  // predicted by whichever of selectModel and setImage gets there first.
  const key = `${state.model}|${state.image.serial}`;
  if (state.predicted === key) return;
  state.predicted = key;
  const controller = new AbortController();
  state.predictController = controller;
  const model = state.model;
  let result;
  try {
    result = await api.predict(model, { model, input: { image: state.image.base64 }, topK: PREDICT_TOP_K }, { signal: controller.signal });
  } catch (error) {
    if (error.name !== "AbortError") $("predict-empty").textContent = "No prediction.";
    throw error;
  }
  if (controller.signal.aborted || model !== state.model) return;
  const { data, ms } = result;
  state.prediction = data;
  timing("predict", data.engineSeconds, ms);
  renderPrediction();
  // Explain the obvious decision at once: the top class, the best box, a dense map's channel.
  const kind = (state.info.task || {}).kind;
  const detections = data.detections || [];
  let target = null;
  if (kind === "detection" || detections.length) {
    if (!detections.length) {
      $("predict-empty").textContent = "No detections above the model's score threshold: nothing to explain.";
      return;
    }
    target = { detection: { index: 0 } };
  } else if ((data.classes || []).length) {
    target = { classIndex: Number(data.classes[0].index || 0) };
  }
  await explainTarget(target).catch((error) => showError(error, "Explain"));
}

function renderPrediction() {
  const data = state.prediction || {};
  // A detector's score output can look like a class vector (BlazeFace: [1, 896, 1], one logit per
  // anchor): its "classes" are anchors, so a declared detector shows its boxes only.
  const detector = ((state.info || {}).task || {}).kind === "detection";
  const classes = detector ? [] : data.classes || [];
  const detections = data.detections || [];
  const list = $("classes");
  list.replaceChildren();
  for (const c of classes) {
    const index = Number(c.index || 0);
    const item = el("li");
    const button = el("button", "choice");
    button.type = "button";
    button.dataset.classIndex = String(index);
    const label = c.label || `class ${index}`;
    button.title = `${label} (class ${index}), logit ${formatNumber(c.logit)}: explain this class`;
    const name = el("span", "name", shortLabel(label));
    const bar = el("span", "bar");
    const fill = el("span", "fill");
    fill.style.width = `${Math.min(Math.max(Number(c.probability || 0), 0), 1) * 100}%`;
    bar.append(fill);
    const pct = el("span", "pct", `${(100 * Number(c.probability || 0)).toFixed(1)}%`);
    button.append(name, el("span", "idx", String(index)), bar, pct);
    button.addEventListener("click", guard("Explain", () => explainTarget({ classIndex: index })));
    item.append(button);
    list.append(item);
  }
  const dl = $("detections");
  dl.replaceChildren();
  detections.forEach((d, i) => {
    const item = el("li");
    const button = el("button", "choice");
    button.type = "button";
    button.dataset.detection = String(i);
    const label = d.label || `class ${Number(d.classIndex || 0)}`;
    const box = (d.box || []).map((v) => Math.round(Number(v)));
    button.title = `detection ${i}: ${label}, box ${box.join(", ")} (x1, y1, x2, y2 in model-input pixels): explain it`;
    const bar = el("span", "bar");
    const fill = el("span", "fill");
    fill.style.width = `${Math.min(Math.max(Number(d.score || 0), 0), 1) * 100}%`;
    bar.append(fill);
    button.append(el("span", "name", `${i}. ${shortLabel(label)}`), el("span", "idx", box.join(",")), bar,
      el("span", "pct", `${(100 * Number(d.score || 0)).toFixed(1)}%`));
    button.addEventListener("click", guard("Explain", () => explainTarget({ detection: { index: i } })));
    item.append(button);
    dl.append(item);
  });
  $("predict-empty").hidden = Boolean(classes.length || detections.length);
  if (!classes.length && !detections.length) {
    const dense = ((state.info || {}).task || {}).kind === "dense";
    $("predict-empty").textContent = detector ? "No detections above the model's score threshold."
      : dense ? "A dense map: its whole channel is explained; drag on the image to explain a region of it."
        : "The model's output is not a class vector.";
  }
  input.setDetections(detections, null);
  markChoice();
}

/** Marks the class or detection being explained (aria-pressed). */
function markChoice() {
  const t = state.target || {};
  for (const b of $("classes").querySelectorAll("button")) {
    b.setAttribute("aria-pressed", String(t.classIndex !== undefined && Number(b.dataset.classIndex) === t.classIndex));
  }
  for (const b of $("detections").querySelectorAll("button")) {
    b.setAttribute("aria-pressed", String(Boolean(t.detection) && Number(b.dataset.detection) === t.detection.index));
  }
  input.setDetections((state.prediction || {}).detections || [], t.detection ? t.detection.index : null);
}

// -- explanation ---------------------------------------------------------------------------------
function resetExplanation() {
  const run = state.run;
  if (run) {
    // A stream whose summary came is done: let its end arrive rather than cancel it.
    if (!run.summary) run.controller.abort();
    // Later, so that no image still loading from one of them fails (every callback checks the run).
    const urls = run.urls;
    setTimeout(() => { for (const promise of urls) promise.then((url) => URL.revokeObjectURL(url)).catch(() => {}); }, 5000);
  }
  state.run = null;
  state.gen += 1;
  tree.clear();
  state.detailsNode = null;
  $("figures").replaceChildren();
  $("maps").hidden = true;
  $("decision-title").textContent = "No explanation yet";
  $("decision-sub").textContent = "";
  $("tree-status").textContent = "";
  $("download-json").disabled = true;
  $("download-report").disabled = true;
  showDetails(null);
}

function track(run, promise) {
  run.urls.push(promise);
  return promise;
}

async function explainTarget(target) {
  clearError();
  state.target = target;
  markChoice();
  await explain();
}

function decisionText(header) {
  const explained = header.explained || {};
  const label = header.label || "";
  const kind = explained.kind || "class";
  if (kind === "detection") {
    const p = explained.probability !== undefined ? ` ${(100 * explained.probability).toFixed(0)}%` : "";
    return `detection ${explained.detection || 0}: \u201c${shortLabel(label) || "class " + (header.target || 0)}\u201d${p}`;
  }
  if (kind === "region") {
    const box = (explained.box || []).map((v) => Math.round(Number(v)));
    return `region of channel ${explained.channel || 0}${box.length ? " [" + box.join(", ") + "]" : " (whole map)"}`;
  }
  if (kind === "element") return `element [${(explained.index || []).join(", ")}]`;
  if (kind === "seed") return "a custom seed";
  return `\u201c${shortLabel(label) || "class " + (header.target || 0)}\u201d (class ${header.target || 0})`;
}

/** The root node's name in the tree: the label, or what kind of target it is. */
function rootLabel(header) {
  const kind = (header.explained || {}).kind || "class";
  if (kind === "class" || kind === "detection") return shortLabel(header.label) || `class ${header.target || 0}`;
  return decisionText(header);
}

/** The explained target's box in input pixels (a region's box scales from its map). */
function explainedBox(header) {
  const explained = header.explained || {};
  const box = (explained.box || []).map(Number);
  if (box.length !== 4) return null;
  if (explained.kind === "region" && (explained.mapShape || []).length === 2) {
    const [mh, mw] = explained.mapShape.map(Number);
    const sy = Number(header.inputHeight || mh) / mh;
    const sx = Number(header.inputWidth || mw) / mw;
    return [box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy];
  }
  return box;
}

function figure(title, caption, code, shown) {
  const fig = el("figure");
  const stack = el("div", "stack");
  const pic = el("img", "pic");
  pic.alt = "";
  const heat = el("img", "heat");
  heat.alt = title;
  stack.append(pic, heat);
  const cap = el("figcaption");
  cap.append(el("b", "", title), document.createTextNode(` \u00b7 ${caption}`));
  if (code) {
    const c = el("code", "", shown || code);
    c.title = code;
    cap.append(document.createTextNode(" "), c);
  }
  fig.append(stack, cap);
  fig.dataset.title = title;
  $("figures").append(fig);
  return { fig, stack, pic, heat };
}

/** Shows an object URL in an image once it is made, if the image still belongs to the run on display. */
function showUrl(run, img, promise) {
  promise.then((url) => {
    if (state.run !== run || !img.isConnected) return;
    img.src = url;
    img.classList.remove("loading");
  }).catch(() => {});
}

/** A root map on its figure; a map without any positive evidence says so under it. */
function setHeat(run, img, promise) {
  img.classList.add("loading");
  showUrl(run, img, promise);
  promise.then((url) => {
    const caption = img.closest("figure") && img.closest("figure").querySelector("figcaption");
    if (state.run === run && caption && isEmpty(url)) caption.append(el("span", "empty", " no positive evidence anywhere"));
  }).catch(() => {});
}

function boxSvg(box, width, height) {
  const NS = "http://www.w3.org/2000/svg";
  const s = document.createElementNS(NS, "svg");
  s.setAttribute("viewBox", `0 0 ${width} ${height}`);
  s.setAttribute("class", "boxes");
  s.setAttribute("aria-hidden", "true");
  const r = document.createElementNS(NS, "rect");
  r.setAttribute("x", box[0]);
  r.setAttribute("y", box[1]);
  r.setAttribute("width", Math.max(0, box[2] - box[0]));
  r.setAttribute("height", Math.max(0, box[3] - box[1]));
  r.setAttribute("class", "target");
  r.setAttribute("stroke-width", Math.max(1.5, width / 110));
  s.append(r);
  return s;
}

function onHeader(run, header) {
  run.header = header;
  const h = Number(header.inputHeight || 0);
  const w = Number(header.inputWidth || 0);
  run.picture = track(run, header.picture ? pictureUrl(header.picture) : greyUrl(w, h));
  run.picture.then((url) => { if (state.run === run) tree.setPicture(url); }).catch(() => {});
  if (h > 0 && w > 0) document.documentElement.style.setProperty("--aspect", String(Math.min(Math.max(w / h, 0.25), 4)));
  $("decision-title").textContent = `Explaining ${decisionText(header)}`;
  renderSub(run);
  const figures = $("figures");
  figures.replaceChildren();
  const layers = header.layers || [];
  run.figures = {
    input: figure("Input", "what the model saw"),
    gap: figure("gAP", "decision evidence at", layers[0] || "", tree.layerLabel(layers[0] || "")),
  };
  const box = explainedBox(header);
  if (box) run.figures.input.stack.append(boxSvg(box, w, h));
  run.figures.input.heat.remove();
  for (const f of Object.values(run.figures)) showUrl(run, f.pic, run.picture);
  $("maps").hidden = false;
  input.setTarget(box ? { box } : null);
  const explained = header.explained || {};
  if (explained.kind === "region" && (explained.mapShape || []).length === 2) state.mapShape = explained.mapShape.map(Number);
}

function renderSub(run) {
  const header = run.header || {};
  const parts = [];
  const explained = header.explained || {};
  parts.push(`${explained.kind === "class" || !explained.kind ? "logit" : "score"} ${formatNumber(header.logit)}`);
  const p = run.summary && run.summary.probability !== undefined ? run.summary.probability : header.probability;
  if (p !== undefined && p !== null) parts.push(`${explained.kind === "detection" ? "confidence" : "probability"} ${(100 * p).toFixed(1)}%`);
  parts.push(`score mode ${(header.score || "SCORE_MODE_NET").replace("SCORE_MODE_", "").toLowerCase()}`);
  parts.push(`${header.model || state.model} v${header.version || "?"}`);
  if (run.summary) parts.push(`${Number(run.summary.nodeCount || 0)} nodes`);
  $("decision-sub").textContent = parts.join(" \u00b7 ");
}

function normNode(n) {
  return {
    id: Number(n.id || 0), parent: n.parent !== undefined ? Number(n.parent) : null, level: Number(n.level || 0),
    layer: n.layer || "", channel: Number(n.channel || 0), score: Number(n.score || 0), share: Number(n.share || 0),
    path: (n.path || []).map(Number), heatmapPng: n.heatmapPng || null,
  };
}

function addNode(run, raw) {
  const n = normNode(raw);
  const data = { path: n.path, level: n.level, layer: n.layer, channel: n.channel, score: n.score, share: n.share };
  if (!n.path.length) {
    data.label = run.header ? rootLabel(run.header) : "";
    data.share = n.share || 1;
  }
  if (n.heatmapPng) data.overlay = track(run, heatmapOverlay(n.heatmapPng, { stretch: !n.path.length }));
  return tree.add(data);
}

async function explain() {
  if (!state.image || !state.model) return;
  resetExplanation();
  const request = explainRequest();
  const run = { gen: state.gen, request, header: null, summary: null, controller: new AbortController(), urls: [], figures: null };
  state.run = run;
  const depth = request.options.depth;
  $("decision-title").textContent = "Explaining\u2026";
  $("tree-status").textContent = "computing level 0\u2026";
  const model = state.model;
  const alive = () => state.run === run;
  let { ms } = await api.explainStream(model, request, (message) => {
    if (!alive()) return;
    const level = Number(message.level || 0);
    if (message.header) onHeader(run, message.header);
    for (const node of message.nodes || []) addNode(run, node);
    if (message.root) {
      const root = addNode(run, message.root);
      if (root.overlay && run.figures) setHeat(run, run.figures.gap.heat, root.overlay);
    }
    if (level >= 1 && !message.summary) {
      for (const node of tree.nodes.values()) if (node.level === level - 1 && node.state === "pending") tree.loaded(node);
      $("tree-status").textContent = level < depth ? `level ${level} of ${depth} arrived, computing level ${level + 1}\u2026` : `level ${level} of ${depth} arrived`;
    }
    if (message.summary) onSummary(run, message.summary, depth);
  }, { signal: run.controller.signal }).catch((error) => {
    if (alive() && error.name !== "AbortError") $("tree-status").textContent = "the explanation failed";
    throw error;
  });
  if (!alive()) return;
  timing("explain", run.summary ? run.summary.engineSeconds : undefined, ms);
}

function onSummary(run, summary, depth) {
  run.summary = summary;
  for (const node of tree.nodes.values()) if (node.level < depth && node.state === "pending") tree.loaded(node);
  renderSub(run);
  const header = run.header || {};
  $("decision-title").textContent = `Evidence for ${decisionText(header)}`;
  const h = Number(header.inputHeight || 0);
  const w = Number(header.inputWidth || 0);
  const cams = summary.cams || {};
  for (const key of ["gradcam", "layercam", ...Object.keys(cams).filter((k) => !(k in CAM_TITLES) && k !== "gap")]) {
    if (!cams[key]) continue;
    const f = figure(CAM_TITLES[key] || key, "baseline, same layer");
    showUrl(run, f.pic, run.picture);
    setHeat(run, f.heat, track(run, camOverlay(cams[key], h, w)));
  }
  const pending = [...tree.nodes.values()].filter((n) => n.state === "pending").length;
  $("tree-status").textContent = `${Number(summary.nodeCount || tree.nodes.size)} nodes` +
    (pending ? ` \u00b7 open a node of level ${depth} to decompose it further` : "");
  $("download-json").disabled = false;
  $("download-report").disabled = false;
  if (!state.detailsNode) showDetails(tree.nodes.get("") || null);
}

/** Expand: the node's children (depth 1), same request otherwise; they join the tree under it. */
async function expandNode(node) {
  const run = state.run;
  if (!run || !run.summary) return;
  // A class's chain is the model's candidate layers (GetModel): a node of the last one has nothing
  // below it, and asking would only be refused. Other targets find their own chain: the server says.
  const kind = ((run.header || {}).explained || {}).kind || "class";
  const chain = ((state.info || {}).layers || []).length;
  if (kind === "class" && !(run.request.options.layers || []).length && chain && node.level >= chain) {
    tree.loaded(node, "the deepest layer of the chain");
    return;
  }
  const request = { ...run.request, options: { ...run.request.options, depth: 1 } };
  let result;
  try {
    result = await api.expand(state.model, request, node.path);
  } catch (error) {
    if (state.run !== run) return;
    const depthError = error instanceof ApiError && error.violations.some((v) => /options\.depth$/.test(v.field));
    if (depthError) {
      tree.loaded(node, "the deepest layer of the chain");
      return;
    }
    node.note = "could not be decomposed";
    tree.loaded(node);
    showError(error, "Expand");
    return;
  }
  if (state.run !== run) return;
  const { data, ms } = result;
  timing("expand", data.engineSeconds, ms);
  // nodes[0] is the node itself (ids renumbered from 0 within the subtree): its children follow.
  const children = ((data.explanation || {}).nodes || []).filter((raw) => normNode(raw).parent === 0);
  for (const raw of children) addNode(run, raw);
  node.expanded = true;
  tree.loaded(node, children.length ? "" : "no supporting channel");
}

// -- node details (hover and focus) --------------------------------------------------------------
function showDetails(node) {
  const box = $("details");
  state.detailsNode = node;
  box.replaceChildren();
  if (!node) {
    box.append(el("p", "muted small", "Hover or focus a node to see its evidence, and what its channel responds to."));
    return;
  }
  const root = !node.parent;
  box.append(el("h2", "", root ? "The decision" : `Level ${node.level} \u00b7 channel ${node.channel}`));
  const stack = el("div", "stack big");
  const pic = el("img", "pic");
  pic.alt = "";
  const heat = el("img", "heat");
  heat.alt = `evidence of ${root ? "the decision" : "channel " + node.channel}`;
  stack.append(pic, heat);
  const run = state.run;
  if (run && run.picture) showUrl(run, pic, run.picture);
  if (run && node.overlay) showUrl(run, heat, node.overlay);
  box.append(stack);
  const dl = el("dl", "kv");
  const row = (k, v, mono) => { dl.append(el("dt", "", k)); dl.append(el("dd", mono ? "mono" : "", v)); };
  if (root) row("Decision", state.run && state.run.header ? decisionText(state.run.header) : node.label || "");
  row("Layer", node.layer, true);
  const kind = root && state.run && state.run.header ? ((state.run.header.explained || {}).kind || "class") : "";
  row(root && (kind === "class" || kind === "detection") ? "Class" : "Channel", String(node.channel));
  row("Score", formatNumber(node.score));
  if (!root) row("Share", `${formatShare(node.share)} of its parent's positive evidence`);
  row("Path", root ? "the decision" : node.path.join(" \u2192 "), true);
  const status = { pending: "not decomposed yet (open it)", loading: "decomposing\u2026", loaded: `${node.children.length} children`, end: node.note || "no children" }[node.state];
  row("Children", status || "");
  box.append(dl);
  if (!root) atlasSection(box, node);
}

function atlasSection(box, node) {
  const section = el("section", "atlas");
  section.append(el("h3", "", "Channel atlas"));
  const body = el("div", "atlas-body muted small", "looking the channel up\u2026");
  section.append(body);
  box.append(section);
  const model = state.model;
  const covered = (state.info && state.info.atlasLayers) || [];
  if (!covered.includes(node.layer)) { // GetModel says which layers the atlas covers: no call for the others
    body.textContent = covered.length ? "the model's channel atlas does not cover this layer"
      : "this model has no channel atlas (gap-service atlas MODEL builds one)";
    return;
  }
  const miss = state.layerMisses.get(`${model}|${node.layer}`);
  if (miss) {
    body.textContent = miss.message;
    return;
  }
  const key = `${model}|${node.layer}|${node.channel}`;
  let entry = state.channels.get(key);
  if (!entry) {
    entry = api.getChannel(model, node.layer, node.channel).then((r) => r.data);
    state.channels.set(key, entry);
    entry.catch((error) => {
      state.channels.delete(key);
      if (error instanceof ApiError && (error.code === 5 || error.code === 9)) state.layerMisses.set(`${model}|${node.layer}`, error);
    });
  }
  entry.then((data) => {
    if (state.detailsNode !== node) return;
    renderAtlas(body, data);
  }).catch((error) => {
    if (state.detailsNode !== node) return;
    body.textContent = error.message || String(error);
  });
}

async function renderAtlas(body, data) {
  body.replaceChildren();
  body.className = "atlas-body";
  const stats = data.stats || {};
  const patches = data.patches || [];
  const p = el("p", "small");
  p.textContent = `mean activation ${formatNumber(stats.mean || 0)}, fires at ${(100 * (stats.fireRate || 0)).toFixed(1)}% of positions ` +
    `and in ${(100 * (stats.imageRate || 0)).toFixed(0)}% of images, max ${formatNumber(stats.max || 0)}`;
  body.append(p);
  if (!data.stripPng || !patches.length) return;
  const size = Number(data.patchSize || 64);
  const grid = el("div", "patches");
  grid.setAttribute("role", "list");
  grid.setAttribute("aria-label", `top ${patches.length} patches of channel ${data.channel || 0}`);
  body.append(grid);
  const bitmap = await createImageBitmap(new Blob([base64ToBytes(data.stripPng)], { type: "image/png" }));
  patches.forEach((patch, i) => {
    const c = el("canvas", "patch");
    c.width = size;
    c.height = size;
    c.getContext("2d").drawImage(bitmap, i * size, 0, size, size, 0, 0, size, size);
    c.setAttribute("role", "listitem");
    c.title = `${i + 1}. ${patch.image || ""} (activation ${formatNumber(patch.activation || 0)})`;
    c.setAttribute("aria-label", c.title);
    grid.append(c);
  });
  bitmap.close();
  body.append(el("p", "muted small", `strongest first, over the atlas's reference images; sheet ${data.sheet || "?"}, row ${data.row || 0}`));
}

// -- downloads -----------------------------------------------------------------------------------
function assembledJson() {
  const run = state.run;
  const header = run.header || {};
  const explanation = { ...header };
  delete explanation.picture;
  if (run.summary && run.summary.probability !== undefined) explanation.probability = run.summary.probability;
  explanation.nodes = tree.toNodes();
  const request = { ...run.request };
  delete request.input; // the image itself stays out: its name and size are beside
  return {
    explanation, // a gap.v1 Explanation in the JSON mapping, without maps
    request, // the ExplainRequest that made the tree (Expand: the same, with options.depth 1 and a path)
    image: { name: state.image.name, bytes: state.image.bytes.length },
    notDecomposed: tree.pending(), // paths of the nodes whose children were never asked for
    engineSeconds: run.summary ? run.summary.engineSeconds : undefined,
  };
}

function downloadJson() {
  const run = state.run;
  if (!run) return;
  const text = JSON.stringify(assembledJson(), null, 2);
  download(`gap-${slug(state.model)}-${slug(decisionText(run.header || {}))}.json`, new Blob([text], { type: "application/json" }));
}

async function downloadReport() {
  const run = state.run;
  if (!run) return;
  const button = $("download-report");
  button.disabled = true;
  const text = button.textContent;
  button.textContent = "Preparing\u2026";
  try {
    const request = { ...run.request, output: { report: true, omitMaps: true } };
    const { data, ms } = await api.explain(state.model, request);
    timing("report", data.engineSeconds, ms);
    if (!data.reportHtml) throw new Error("the server sent no report (reportHtml is empty: a server without OutputOptions.report?)");
    download(`gap-${slug(state.model)}-${slug(decisionText(run.header || {}))}.html`,
      new Blob([base64ToBytes(data.reportHtml)], { type: "text/html" }));
  } finally {
    button.textContent = text;
    button.disabled = state.run !== run;
  }
}

// -- wiring --------------------------------------------------------------------------------------
const tree = new TreeView($("tree"), {
  load: (node) => expandNode(node).catch((error) => showError(error, "Expand")),
  hover: (node) => showDetails(node || tree.focused || null),
  select: (node) => showDetails(node),
  changed: (node) => { if (state.detailsNode === node) showDetails(node); },
});

const input = new ImageInput({
  drop: $("drop"), file: $("file"), preview: $("preview"), canvas: $("preview-canvas"), boxes: $("preview-boxes"),
  name: $("image-name"), hint: $("drop-hint"),
}, {
  image: guard("Predict", (bytes, name) => setImage(bytes, name)),
  detection: guard("Explain", (i) => explainTarget({ detection: { index: i } })),
  region: guard("Explain", (box) => {
    const [h, w] = inputSize(state.info);
    const [mh, mw] = state.mapShape || [h, w];
    const scaled = [box[0] * mw / w, box[1] * mh / h, box[2] * mw / w, box[3] * mh / h].map((v) => Math.round(v * 100) / 100);
    return explainTarget({ region: { channel: Math.max(0, Math.round(Number($("region-channel").value) || 0)), box: scaled } });
  }),
});

let settingsPanel = () => {};

function wire() {
  $("model").addEventListener("change", guard("Model", () => selectModel($("model").value)));
  $("error-close").addEventListener("click", clearError);
  $("download-json").addEventListener("click", guard("Download", downloadJson));
  $("download-report").addEventListener("click", guard("Report", downloadReport));
  $("opacity").addEventListener("input", () => document.documentElement.style.setProperty("--overlay", $("opacity").value));
  document.documentElement.style.setProperty("--overlay", $("opacity").value);
  let timer = null;
  for (const id of ["top-k", "depth", "score"]) {
    $(id).addEventListener("change", () => {
      clearTimeout(timer);
      timer = setTimeout(guard("Explain", () => (state.run ? explain() : undefined)), 250);
    });
  }
  const panel = $("settings");
  const toggle = (open) => {
    panel.hidden = !open;
    $("settings-button").setAttribute("aria-expanded", String(open));
    if (open) $("api-key").focus();
  };
  settingsPanel = toggle;
  const applyKey = guard("Models", async () => {
    const key = $("api-key").value.trim();
    if (key === apiKey()) return;
    setApiKey(key);
    clearError();
    await loadModels();
  });
  $("settings-button").addEventListener("click", () => toggle(panel.hidden));
  $("settings-close").addEventListener("click", () => { toggle(false); applyKey(); });
  panel.addEventListener("submit", (event) => { event.preventDefault(); toggle(false); applyKey(); });
  $("api-key").value = apiKey();
  $("api-key").addEventListener("change", applyKey);
  const examples = $("examples");
  for (const example of EXAMPLES) {
    const button = el("button", "example");
    button.type = "button";
    button.title = example.title;
    button.setAttribute("aria-label", `Example: ${example.title}`);
    const img = el("img");
    img.src = example.file;
    img.alt = "";
    button.append(img);
    button.addEventListener("click", guard("Example", () => input.fromUrl(example.file, example.name)));
    examples.append(button);
  }
}

async function main() {
  wire();
  try {
    const { data } = await api.colormap();
    setColormap(data);
    drawLegend($("legend"));
  } catch (error) {
    showError(error, "Colour map");
    return;
  }
  try {
    await loadModels();
  } catch (error) {
    showError(error, "Models");
    // No key, or one that may not list the models: the key field is where to fix it.
    if (error instanceof ApiError && (error.code === 16 || error.code === 7)) settingsPanel(true);
  }
}

main();
