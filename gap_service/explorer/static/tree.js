// The decomposition tree as an ARIA tree (role="tree"/"treeitem"/"group"): nodes are added as
// the stream or an Expand delivers them; opening a node whose children were never computed asks
// the page to Expand it. Keyboard: the WAI-ARIA tree pattern with a roving tabindex.

export const LEVEL_COLOURS = 8; // lv0 ... lv7 in explorer.css, the report's level colours

export function formatShare(share) {
  const percent = 100 * Number(share || 0);
  if (percent !== 0 && Math.abs(percent) < 0.1) return "<0.1%";
  return `${percent.toFixed(1)}%`;
}

export function formatNumber(value) {
  if (value === undefined || value === null || Number.isNaN(Number(value))) return "n/a";
  return Number(value).toPrecision(4).replace(/\.?0+(e|$)/, "$1");
}

export function shortName(name, limit = 28) {
  return name.length <= limit ? name : "\u2026" + name.slice(-(limit - 1));
}

const SEPARATORS = /[/._:-]/;

/**
 * Layer names as a card can show them: a model's exported names share long prefixes and suffixes
 * ("/_blocks.11/_swish/Clip_output_0"), so what they share (cut at a separator) is left out of
 * long ones ("blocks.11/_swish"); the full name is on the card's title and in the details.
 */
export function layerLabeller(names, limit = 20) {
  const list = names.filter(Boolean);
  let prefix = 0;
  let suffix = 0;
  if (list.length > 1) {
    const [a, ...rest] = list;
    while (prefix < a.length && rest.every((n) => n[prefix] === a[prefix])) prefix++;
    while (suffix < a.length && rest.every((n) => n[n.length - 1 - suffix] === a[a.length - 1 - suffix])) suffix++;
    while (prefix > 0 && !SEPARATORS.test(a[prefix - 1])) prefix--; // whole segments only
    while (suffix > 0 && !SEPARATORS.test(a[a.length - suffix])) suffix--;
  }
  return (name) => {
    if (!name || name.length <= limit || !list.includes(name)) return shortName(name || "", limit);
    const middle = name.slice(prefix, name.length - suffix).replace(/^[/._:-]+|[/._:-]+$/g, "");
    return middle ? shortName(middle, limit) : shortName(name, limit);
  };
}

function element(tag, className, text) {
  const el = document.createElement(tag);
  if (className) el.className = className;
  if (text !== undefined) el.textContent = text;
  return el;
}

export class TreeView {
  /**
   * @param {HTMLElement} root the <ul role="tree">
   * @param {{load(node): Promise<void>, hover(node|null): void, select(node): void}} hooks
   */
  constructor(root, hooks) {
    this.root = root;
    this.hooks = hooks;
    this.nodes = new Map(); // key (path joined by "/") -> node
    this.pictureUrl = null;
    this.focused = null;
    this.layerLabel = (name) => shortName(name || "", 20);
    root.addEventListener("keydown", (event) => this.onKey(event));
    root.addEventListener("focusin", (event) => {
      const node = this.nodeOf(event.target);
      if (node) this.setFocus(node, false);
    });
    root.addEventListener("mouseover", (event) => {
      const row = event.target.closest && event.target.closest(".row");
      if (row && this.root.contains(row)) this.hooks.hover(this.nodeOf(row));
    });
    root.addEventListener("mouseleave", () => this.hooks.hover(null));
    root.addEventListener("click", (event) => {
      const row = event.target.closest && event.target.closest(".row");
      if (!row || !this.root.contains(row)) return;
      const node = this.nodeOf(row);
      this.setFocus(node, true);
      this.toggle(node);
    });
  }

  static key(path) {
    return (path || []).join("/");
  }

  clear() {
    this.nodes.clear();
    this.pictureUrl = null;
    this.focused = null;
    this.root.replaceChildren();
  }

  /** The model's layer names, so that cards can show the part that tells them apart. */
  setLayers(names) {
    this.layerLabel = layerLabeller(names);
  }

  setPicture(url) {
    this.pictureUrl = url;
    for (const img of this.root.querySelectorAll("img.pic")) img.src = url;
  }

  nodeOf(target) {
    const li = target && target.closest ? target.closest("[role=treeitem]") : null;
    return li ? this.nodes.get(li.dataset.key) : null;
  }

  /**
   * Adds (or updates) a node. `node`: {path, level, layer, channel, score, share, label?, overlay?:
   * Promise<url>}. The parent (path minus its last step) must be there already, except for the root.
   */
  add(data) {
    const key = TreeView.key(data.path);
    let node = this.nodes.get(key);
    if (node) {
      if (data.overlay && data.overlay !== node.overlay) node.overlayBound = false;
      Object.assign(node, data, { children: node.children });
      this.render(node);
      return node;
    }
    node = { ...data, key, children: [], state: "pending", expanded: true, note: "" };
    const parentKey = data.path.length ? TreeView.key(data.path.slice(0, -1)) : null;
    node.parent = parentKey === null ? null : this.nodes.get(parentKey) || null;
    if (parentKey !== null && !node.parent) throw new Error(`node ${key} arrived before its parent`);
    this.nodes.set(key, node);
    this.build(node);
    if (node.parent) {
      node.parent.children.push(node);
      node.parent.groupEl.append(node.el);
      node.parent.children.forEach((child, i) => {
        child.el.setAttribute("aria-setsize", String(node.parent.children.length));
        child.el.setAttribute("aria-posinset", String(i + 1));
      });
      this.render(node.parent);
    } else {
      this.root.append(node.el);
      node.el.setAttribute("aria-setsize", "1");
      node.el.setAttribute("aria-posinset", "1");
      node.expanded = true;
      this.setFocus(node, false);
    }
    this.render(node);
    return node;
  }

  build(node) {
    const li = element("li");
    li.setAttribute("role", "treeitem");
    li.dataset.key = node.key;
    li.tabIndex = -1;
    li.setAttribute("aria-level", String(node.level + 1));
    li.setAttribute("aria-selected", "false");
    const row = element("div", "row");
    const twisty = element("span", "twisty");
    twisty.setAttribute("aria-hidden", "true");
    const thumb = element("span", "thumb stack");
    const pic = element("img", "pic");
    pic.alt = "";
    if (this.pictureUrl) pic.src = this.pictureUrl;
    const heat = element("img", "heat");
    heat.alt = "";
    thumb.append(pic, heat);
    const meta = element("span", "meta");
    const title = element("span", "title");
    const badge = element("span", `badge lv${node.level % LEVEL_COLOURS}`, `L${node.level}`);
    const name = element("span", "ch");
    title.append(badge, name);
    const share = element("span", "share");
    const bar = element("span", "bar");
    const fill = element("span", `fill lv${node.level % LEVEL_COLOURS}`);
    bar.append(fill);
    const pct = element("span", "pct");
    share.append(bar, pct);
    const sub = element("span", "sub mono");
    const score = element("span", "score");
    const layer = element("span", "layer");
    sub.append(score, layer);
    const note = element("span", "note");
    meta.append(title, share, sub, note);
    row.append(twisty, thumb, meta);
    const group = element("ul");
    group.setAttribute("role", "group");
    li.append(row, group);
    Object.assign(node, { el: li, rowEl: row, groupEl: group, heatEl: heat, nameEl: name, fillEl: fill, pctEl: pct, scoreEl: score,
      layerEl: layer, noteEl: note });
  }

  render(node) {
    const root = !node.parent;
    node.nameEl.textContent = root ? (node.label || `class ${node.channel}`) : `ch ${node.channel}`;
    node.fillEl.style.width = `${Math.min(Math.max(Number(node.share || 0), 0), 1) * 100}%`;
    node.pctEl.textContent = formatShare(node.share);
    node.scoreEl.textContent = formatNumber(node.score);
    node.layerEl.textContent = ` \u00b7 ${this.layerLabel(node.layer)}`;
    node.layerEl.title = node.layer || "";
    node.noteEl.textContent = node.note || "";
    node.noteEl.hidden = !node.note;
    const expandable = node.state === "pending" || node.state === "loading" || node.children.length > 0;
    if (expandable) node.el.setAttribute("aria-expanded", String(Boolean(node.expanded && node.children.length)));
    else node.el.removeAttribute("aria-expanded");
    node.el.classList.toggle("leaf", !expandable);
    node.el.setAttribute("aria-busy", String(node.state === "loading"));
    node.groupEl.hidden = !(node.expanded && node.children.length);
    node.groupEl.classList.toggle("twig", node.children.length > 0 && node.children.every((c) => !(c.expanded && c.children.length)));
    if (node.parent) {
      const siblings = node.parent.children;
      node.parent.groupEl.classList.toggle("twig", siblings.every((c) => !(c.expanded && c.children.length)));
    }
    const what = root ? `decision ${node.label || "class " + node.channel}` : `level ${node.level} channel ${node.channel}`;
    node.el.setAttribute("aria-label", `${what}, ${formatShare(node.share)} of its parent, score ${formatNumber(node.score)}` +
      (node.state === "pending" ? ", not decomposed yet" : "") + (node.note ? `, ${node.note}` : ""));
    if (node.overlay && !node.overlayBound) {
      node.overlayBound = true;
      node.overlay.then((url) => {
        if (this.nodes.get(node.key) === node) node.heatEl.src = url; // not a tree cleared since
      }).catch(() => {});
    }
  }

  /** Marks a node's children as computed (they are all there). */
  loaded(node, note = "") {
    node.state = node.children.length ? "loaded" : "end";
    if (note) node.note = note;
    this.render(node);
    this.hooks.changed(node);
  }

  async toggle(node) {
    if (node.state === "loading") return;
    if (node.state === "pending") {
      node.state = "loading";
      node.expanded = true;
      this.render(node);
      this.hooks.changed(node);
      try {
        await this.hooks.load(node);
      } finally {
        if (node.state === "loading") node.state = node.children.length ? "loaded" : "end";
        this.render(node);
        this.hooks.changed(node);
      }
      return;
    }
    if (!node.children.length) return;
    node.expanded = !node.expanded;
    this.render(node);
  }

  open(node) {
    if (node.state === "pending") return this.toggle(node);
    if (node.children.length && !node.expanded) {
      node.expanded = true;
      this.render(node);
    }
    return Promise.resolve();
  }

  setFocus(node, move = true) {
    if (!node) return;
    if (this.focused && this.focused !== node && this.focused.el) {
      this.focused.el.tabIndex = -1;
      this.focused.el.setAttribute("aria-selected", "false");
    }
    this.focused = node;
    node.el.tabIndex = 0;
    node.el.setAttribute("aria-selected", "true");
    if (move && document.activeElement !== node.el) node.el.focus({ preventScroll: false });
    this.hooks.select(node);
  }

  visible() {
    const out = [];
    const walk = (node) => {
      out.push(node);
      if (node.expanded) node.children.forEach(walk);
    };
    const root = this.nodes.get("");
    if (root) walk(root);
    return out;
  }

  onKey(event) {
    const node = this.nodeOf(event.target);
    if (!node || event.altKey || event.ctrlKey || event.metaKey) return;
    const list = this.visible();
    const at = list.indexOf(node);
    let handled = true;
    switch (event.key) {
      case "ArrowDown": if (at + 1 < list.length) this.setFocus(list[at + 1]); break;
      case "ArrowUp": if (at > 0) this.setFocus(list[at - 1]); break;
      case "Home": this.setFocus(list[0]); break;
      case "End": this.setFocus(list[list.length - 1]); break;
      case "ArrowRight":
        if (node.state === "pending") this.toggle(node);
        else if (node.children.length && !node.expanded) this.open(node);
        else if (node.children.length) this.setFocus(node.children[0]);
        break;
      case "ArrowLeft":
        if (node.expanded && node.children.length) { node.expanded = false; this.render(node); }
        else if (node.parent) this.setFocus(node.parent);
        break;
      case "Enter":
      case " ":
        this.toggle(node);
        break;
      default:
        handled = false;
    }
    if (handled) event.preventDefault();
  }

  /** Paths of the nodes whose children were never computed. */
  pending() {
    return [...this.nodes.values()].filter((n) => n.state === "pending").map((n) => n.path.slice());
  }

  /**
   * The assembled tree as gap.v1 Explanation nodes: ids level by level, in the order of their
   * parents, best child first (the order Explain gives a full tree), children by id.
   */
  toNodes() {
    const root = this.nodes.get("");
    if (!root) return [];
    const order = [root];
    for (let i = 0; i < order.length; i++) order.push(...order[i].children);
    const ids = new Map(order.map((node, i) => [node, i]));
    return order.map((node, id) => {
      const entry = { id, level: node.level, layer: node.layer, channel: node.channel, score: node.score, share: node.share,
        children: node.children.map((child) => ids.get(child)), path: node.path.slice() };
      if (node.parent) entry.parent = ids.get(node.parent);
      return entry;
    });
  }
}
