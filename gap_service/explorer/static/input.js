// The image: a file input, drag and drop, bundled examples; a preview of what the model sees
// (the model's resize and crop from GetModel's preprocessing, so boxes are drawn in model-input
// pixels); a detector's boxes (click one to explain it) and, for dense models, a box drawn with
// the mouse (a region target).

const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attributes = {}) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attributes)) el.setAttribute(k, String(v));
  return el;
}

/** [height, width] of the model's input from GetModel (inputs[0] with the preprocessing's layout). */
export function inputSize(info) {
  const shape = ((info.inputs || [])[0] || {}).shape || [];
  const dims = shape.map(Number);
  const layout = (info.preprocessing || {}).layout || "NCHW";
  if (dims.length === 4) return layout === "NHWC" ? [dims[1], dims[2]] : [dims[2], dims[3]];
  const size = ((info.preprocessing || {}).size || []).map(Number);
  return size.length >= 2 ? [size[0], size[1]] : [224, 224];
}

/** Where the model's preprocessing puts an image of `w` x `h`: {width, height, dx, dy, dw, dh}. */
export function geometry(preprocessing, w, h, fallback) {
  const p = preprocessing || {};
  const size = (p.size || []).map(Number);
  const crop = (p.crop || []).map(Number);
  if (p.resize === "shorter_side" && size.length) {
    const ratio = size[0] / Math.min(w, h);
    const rw = Math.round(w * ratio);
    const rh = Math.round(h * ratio);
    if (crop.length === 2) {
      const top = Math.floor((rh - crop[0]) / 2);
      const left = Math.floor((rw - crop[1]) / 2);
      return { width: crop[1], height: crop[0], dx: -left, dy: -top, dw: rw, dh: rh };
    }
    return { width: rw, height: rh, dx: 0, dy: 0, dw: rw, dh: rh };
  }
  if (p.resize === "fit_height" && size.length >= 2) {
    const rw = Math.min(size[1], Math.ceil(size[0] * w / h));
    return { width: size[1], height: size[0], dx: 0, dy: 0, dw: rw, dh: size[0] };
  }
  const [height, width] = size.length >= 2 ? size : fallback;
  return { width, height, dx: 0, dy: 0, dw: width, dh: height };
}

export class ImageInput {
  constructor(elements, hooks) {
    Object.assign(this, elements);
    this.hooks = hooks;
    this.info = null;
    this.bitmap = null;
    this.size = [224, 224];
    this.regionMode = false;
    this.drag = null;
    this.file.addEventListener("change", () => {
      const file = this.file.files && this.file.files[0];
      if (file) this.readFile(file);
      this.file.value = "";
    });
    const stop = (event) => { event.preventDefault(); event.stopPropagation(); };
    for (const type of ["dragenter", "dragover"]) {
      this.drop.addEventListener(type, (event) => { stop(event); this.drop.classList.add("over"); });
    }
    for (const type of ["dragleave", "drop"]) {
      this.drop.addEventListener(type, (event) => { stop(event); this.drop.classList.remove("over"); });
    }
    this.drop.addEventListener("drop", (event) => {
      const file = event.dataTransfer && event.dataTransfer.files && event.dataTransfer.files[0];
      if (file) this.readFile(file);
    });
    // A file dropped anywhere else must not navigate away from the page.
    window.addEventListener("dragover", (event) => event.preventDefault());
    window.addEventListener("drop", (event) => event.preventDefault());
    this.boxes.addEventListener("pointerdown", (event) => this.startRegion(event));
    this.boxes.addEventListener("pointermove", (event) => this.moveRegion(event));
    this.boxes.addEventListener("pointerup", (event) => this.endRegion(event));
    this.boxes.addEventListener("pointercancel", () => { this.drag = null; this.drawOverlay(); });
    this.detections = [];
    this.selected = null;
    this.target = null; // {box, label} in input pixels
  }

  async readFile(file) {
    const bytes = new Uint8Array(await file.arrayBuffer());
    this.hooks.image(bytes, file.name || "image");
  }

  async fromUrl(href, name) {
    const response = await fetch(href);
    if (!response.ok) throw new Error(`${name}: HTTP ${response.status}`);
    this.hooks.image(new Uint8Array(await response.arrayBuffer()), name);
  }

  setModel(info) {
    this.info = info;
    this.size = inputSize(info);
    this.redraw();
  }

  /** Shows the image as the model will see it; a file the browser cannot decode is still sent. */
  async show(bytes, name) {
    if (this.bitmap) this.bitmap.close();
    this.bitmap = null;
    this.name.textContent = name;
    try {
      this.bitmap = await createImageBitmap(new Blob([bytes]));
    } catch {
      this.bitmap = null;
    }
    this.detections = [];
    this.selected = null;
    this.target = null;
    this.redraw();
    if (!this.bitmap) this.name.textContent = `${name} (the browser cannot show it; the server will say what it makes of it)`;
  }

  redraw() {
    if (!this.bitmap || !this.info) {
      this.preview.hidden = true;
      this.hint.hidden = false;
      return;
    }
    const g = geometry(this.info.preprocessing, this.bitmap.width, this.bitmap.height, this.size);
    this.canvas.width = g.width;
    this.canvas.height = g.height;
    const ctx = this.canvas.getContext("2d");
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, g.width, g.height);
    ctx.imageSmoothingQuality = "high";
    ctx.drawImage(this.bitmap, g.dx, g.dy, g.dw, g.dh);
    this.boxes.setAttribute("viewBox", `0 0 ${g.width} ${g.height}`);
    this.preview.hidden = false;
    this.hint.hidden = true;
    this.drawOverlay();
  }

  setDetections(detections, selected) {
    this.detections = detections || [];
    this.selected = selected;
    this.drawOverlay();
  }

  setTarget(target) {
    this.target = target;
    this.drawOverlay();
  }

  setRegionMode(on) {
    this.regionMode = on;
    this.boxes.classList.toggle("drawing", on);
  }

  drawOverlay() {
    this.boxes.replaceChildren();
    const stroke = Math.max(1.5, this.canvas.width / 180);
    this.detections.forEach((d, i) => {
      const [x1, y1, x2, y2] = (d.box || []).map(Number);
      const rect = svg("rect", { x: x1, y: y1, width: Math.max(0, x2 - x1), height: Math.max(0, y2 - y1),
        class: `det${i === this.selected ? " selected" : ""}`, "stroke-width": stroke });
      const title = svg("title");
      title.textContent = `detection ${i}: ${d.label || "class " + (d.classIndex || 0)} ${(100 * (d.score || 0)).toFixed(0)}%`;
      rect.append(title);
      rect.addEventListener("click", () => this.hooks.detection(i));
      this.boxes.append(rect);
    });
    if (this.target && this.target.box && this.selected === null) {
      const [x1, y1, x2, y2] = this.target.box;
      this.boxes.append(svg("rect", { x: x1, y: y1, width: x2 - x1, height: y2 - y1, class: "target", "stroke-width": stroke }));
    }
    if (this.drag && this.drag.now) {
      const [x1, y1, x2, y2] = this.dragBox();
      this.boxes.append(svg("rect", { x: x1, y: y1, width: x2 - x1, height: y2 - y1, class: "drag", "stroke-width": stroke }));
    }
  }

  point(event) {
    const rect = this.boxes.getBoundingClientRect();
    const x = (event.clientX - rect.left) / rect.width * this.canvas.width;
    const y = (event.clientY - rect.top) / rect.height * this.canvas.height;
    return [Math.min(Math.max(x, 0), this.canvas.width), Math.min(Math.max(y, 0), this.canvas.height)];
  }

  dragBox() {
    const [ax, ay] = this.drag.start;
    const [bx, by] = this.drag.now;
    return [Math.min(ax, bx), Math.min(ay, by), Math.max(ax, bx), Math.max(ay, by)];
  }

  startRegion(event) {
    if (!this.regionMode || event.button !== 0) return;
    event.preventDefault();
    this.boxes.setPointerCapture(event.pointerId);
    this.drag = { start: this.point(event), now: null };
  }

  moveRegion(event) {
    if (!this.drag) return;
    this.drag.now = this.point(event);
    this.drawOverlay();
  }

  endRegion(event) {
    if (!this.drag) return;
    this.drag.now = this.point(event);
    const box = this.dragBox();
    this.drag = null;
    if (box[2] - box[0] >= 2 && box[3] - box[1] >= 2) this.hooks.region(box.map((v) => Math.round(v)));
    this.drawOverlay();
  }
}
