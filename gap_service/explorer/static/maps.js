// Pictures and evidence maps: gap.v1 Tensors decoded, the server's heatmap PNGs and CAM tensors
// turned into overlays in the project's one colour map (GET /colormap.json), drawn the way the
// HTML report draws them: opacity grows with the square root of the evidence, and where there is
// none the picture is left as it is.

import { base64ToBytes } from "./api.js";

let LUT = null; // 256 [r, g, b]
let INDEX = null; // packed rgb -> colour-map index

export function setColormap(entries) {
  LUT = entries.map((c) => [c[0] | 0, c[1] | 0, c[2] | 0]);
  INDEX = new Map();
  LUT.forEach((c, i) => { if (!INDEX.has(pack(c[0], c[1], c[2]))) INDEX.set(pack(c[0], c[1], c[2]), i); });
}

export function colormapReady() {
  return LUT !== null;
}

function pack(r, g, b) {
  return (r << 16) | (g << 8) | b;
}

function nearest(r, g, b) {
  let best = 0;
  let bestD = Infinity;
  for (let i = 0; i < LUT.length; i++) {
    const c = LUT[i];
    const d = (c[0] - r) ** 2 + (c[1] - g) ** 2 + (c[2] - b) ** 2;
    if (d < bestD) { bestD = d; best = i; }
  }
  INDEX.set(pack(r, g, b), best);
  return best;
}

/** The legend: the colour map from low to high on a canvas. */
export function drawLegend(canvas) {
  if (!LUT) return;
  canvas.width = LUT.length;
  canvas.height = 1;
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(LUT.length, 1);
  LUT.forEach((c, i) => image.data.set([c[0], c[1], c[2], 255], i * 4));
  ctx.putImageData(image, 0, 0);
}

// -- tensors ----------------------------------------------------------------------------------
function float16(bits) {
  const sign = bits & 0x8000 ? -1 : 1;
  const exponent = (bits >> 10) & 0x1f;
  const fraction = bits & 0x3ff;
  if (exponent === 0) return sign * 2 ** -14 * (fraction / 1024);
  if (exponent === 31) return fraction ? NaN : sign * Infinity;
  return sign * 2 ** (exponent - 15) * (1 + fraction / 1024);
}

/** A gap.v1 Tensor (JSON mapping) as {shape: number[], values: typed array}. */
export function decodeTensor(tensor) {
  const shape = (tensor.shape || []).map(Number);
  const bytes = base64ToBytes(tensor.data || "");
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const count = shape.reduce((a, b) => a * b, 1);
  const dtype = tensor.dtype || "DATA_TYPE_UNSPECIFIED";
  let values;
  if (dtype === "DATA_TYPE_UINT8") values = bytes.subarray(0, count);
  else if (dtype === "DATA_TYPE_FLOAT32") {
    values = new Float32Array(count);
    for (let i = 0; i < count; i++) values[i] = view.getFloat32(4 * i, true);
  } else if (dtype === "DATA_TYPE_FLOAT16") {
    values = new Float32Array(count);
    for (let i = 0; i < count; i++) values[i] = float16(view.getUint16(2 * i, true));
  } else if (dtype === "DATA_TYPE_FLOAT64") {
    values = new Float64Array(count);
    for (let i = 0; i < count; i++) values[i] = view.getFloat64(8 * i, true);
  } else {
    throw new Error(`tensor type ${dtype} is not drawn here`);
  }
  return { shape, values };
}

/** Bilinear resize of an [h, w] map to [outH, outW], align_corners=False (as the server upsamples). */
export function upsample(values, h, w, outH, outW) {
  const axis = (inLen, outLen) => {
    const low = new Int32Array(outLen);
    const high = new Int32Array(outLen);
    const frac = new Float32Array(outLen);
    for (let o = 0; o < outLen; o++) {
      const coord = Math.min(Math.max((o + 0.5) * inLen / outLen - 0.5, 0), inLen - 1);
      low[o] = Math.floor(coord);
      high[o] = Math.min(low[o] + 1, inLen - 1);
      frac[o] = coord - low[o];
    }
    return { low, high, frac };
  };
  const ry = axis(h, outH);
  const rx = axis(w, outW);
  const out = new Float32Array(outH * outW);
  for (let y = 0; y < outH; y++) {
    const y0 = ry.low[y] * w;
    const y1 = ry.high[y] * w;
    const fy = ry.frac[y];
    for (let x = 0; x < outW; x++) {
      const x0 = rx.low[x];
      const x1 = rx.high[x];
      const fx = rx.frac[x];
      const top = values[y0 + x0] * (1 - fx) + values[y0 + x1] * fx;
      const bottom = values[y1 + x0] * (1 - fx) + values[y1 + x1] * fx;
      out[y * outW + x] = top * (1 - fy) + bottom * fy;
    }
  }
  return out;
}

// -- images -----------------------------------------------------------------------------------
function canvasOf(width, height) {
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  return canvas;
}

function blobUrl(canvas) {
  return new Promise((resolve, reject) => {
    canvas.toBlob((blob) => (blob ? resolve(URL.createObjectURL(blob)) : reject(new Error("canvas encoding failed"))), "image/png");
  });
}

/** The picture the model saw (uint8 [H, W, 3] tensor) as an object URL. */
export async function pictureUrl(tensor) {
  const { shape, values } = decodeTensor(tensor);
  const [h, w, c] = shape;
  const canvas = canvasOf(w, h);
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(w, h);
  for (let i = 0, j = 0; i < h * w; i++, j += c) {
    image.data[4 * i] = values[j];
    image.data[4 * i + 1] = values[c > 1 ? j + 1 : j];
    image.data[4 * i + 2] = values[c > 2 ? j + 2 : j];
    image.data[4 * i + 3] = 255;
  }
  ctx.putImageData(image, 0, 0);
  return blobUrl(canvas);
}

/** A grey canvas of the input size, for explanations without a picture (tensor inputs). */
export function greyUrl(width, height) {
  const canvas = canvasOf(Math.max(1, width), Math.max(1, height));
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#808080";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  return blobUrl(canvas);
}

/**
 * Heat in [0, 1] per pixel as an RGBA overlay: colour from the map, alpha sqrt(heat) (the page's
 * opacity slider scales it), fully transparent where heat is 0.
 */
const EMPTY = new Set(); // overlays of maps without any positive evidence

/** Whether the overlay at this URL shows no evidence at all (an all-zero map). */
export function isEmpty(url) {
  return EMPTY.has(url);
}

async function overlayUrl(heat, width, height) {
  const canvas = canvasOf(width, height);
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(width, height);
  const top = LUT.length - 1;
  for (let i = 0; i < heat.length; i++) {
    const v = heat[i] > 0 ? Math.min(heat[i], 1) : 0;
    const c = LUT[Math.round(v * top)];
    image.data[4 * i] = c[0];
    image.data[4 * i + 1] = c[1];
    image.data[4 * i + 2] = c[2];
    image.data[4 * i + 3] = v > 0 ? Math.round(255 * Math.sqrt(v)) : 0;
  }
  ctx.putImageData(image, 0, 0);
  const url = await blobUrl(canvas);
  if (!heat.some((v) => v > 0)) EMPTY.add(url);
  return url;
}

/**
 * A node's heatmap PNG (the server's colour-mapped map, already at the input resolution) turned
 * back into heat through the colour map, then into an overlay. `stretch` shifts the map so its
 * minimum is zero (the report does this for decision-level maps, which are positive almost
 * everywhere).
 */
export async function heatmapOverlay(base64, { stretch = false } = {}) {
  const blob = new Blob([base64ToBytes(base64)], { type: "image/png" });
  const bitmap = await createImageBitmap(blob, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
  const { width, height } = bitmap;
  const canvas = canvasOf(width, height);
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(bitmap, 0, 0);
  bitmap.close();
  const rgba = ctx.getImageData(0, 0, width, height).data;
  const heat = new Float32Array(width * height);
  const top = LUT.length - 1;
  for (let i = 0; i < heat.length; i++) {
    const r = rgba[4 * i];
    const g = rgba[4 * i + 1];
    const b = rgba[4 * i + 2];
    const index = INDEX.get(pack(r, g, b));
    heat[i] = (index !== undefined ? index : nearest(r, g, b)) / top;
  }
  return overlayUrl(stretch ? stretched(heat) : heat, width, height);
}

function stretched(values) {
  let min = Infinity;
  for (const v of values) if (v < min) min = v;
  const out = new Float32Array(values.length);
  for (let i = 0; i < values.length; i++) out[i] = values[i] - min;
  return out;
}

function normalised(values) {
  let max = 0;
  for (const v of values) if (Number.isFinite(v) && v > max) max = v;
  const out = new Float32Array(values.length);
  if (max > 0) for (let i = 0; i < values.length; i++) out[i] = Number.isFinite(values[i]) && values[i] > 0 ? values[i] / max : 0;
  return out;
}

/** A CAM tensor [h, w] (or [1, h, w]) at layer resolution as an overlay at the input size. */
export async function camOverlay(tensor, height, width) {
  const { shape, values } = decodeTensor(tensor);
  const h = shape[shape.length - 2] || 1;
  const w = shape[shape.length - 1] || 1;
  const clean = Float32Array.from(values, (v) => (Number.isFinite(v) ? v : 0));
  const big = upsample(clean, h, w, height, width);
  return overlayUrl(normalised(stretched(big)), width, height);
}
