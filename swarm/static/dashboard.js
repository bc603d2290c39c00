// DLLM dashboard: polls /api/swarm and redraws. Every value from the DHT or the chain is untrusted
// text, so the page is built with DOM calls and textContent only (never innerHTML).
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
let planckPerToken = 1; // set from each snapshot (chain/units.py is the one definition)
let timer = null;

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}

function svg(tag, attrs = {}, text = null) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text !== null) node.textContent = String(text);
  return node;
}

const short = (id) => (id && id.length > 14 ? id.slice(0, 6) + "…" + id.slice(-6) : id || "");
const tokens = (amount) => (amount / planckPerToken).toLocaleString(undefined, { maximumFractionDigits: 6 });

function coverageColor(count) {
  if (count === 0) return "#e05050";
  if (count === 1) return "#e0a030";
  return "#3fb37f";
}

// The block-coverage picture: one column per block, a coverage row, then one bar per peer.
function coverageSvg(model) {
  const n = model.num_blocks;
  const label = 150, cell = Math.max(24, Math.min(60, 760 / Math.max(n, 1))), row = 22, top = 18;
  const height = top + row * (model.peers.length + 1) + 6;
  const root = svg("svg", { class: "coverage", viewBox: `0 0 ${label + cell * n + 4} ${height}`,
                            "data-model": model.name, role: "img" });
  root.append(svg("title", {}, `Block coverage of ${model.name}`));
  for (let b = 0; b < n; b++) {
    root.append(svg("text", { x: label + cell * b + cell / 2, y: 12, "text-anchor": "middle", class: "axis" }, b));
  }
  root.append(svg("text", { x: 0, y: top + 15, class: "axis" }, "peers per block"));
  model.coverage.forEach((count, b) => {
    const g = svg("g", { "data-block": b, "data-count": count });
    g.append(svg("rect", { x: label + cell * b + 1, y: top + 2, width: cell - 2, height: row - 4, rx: 3,
                           fill: coverageColor(count) }));
    g.append(svg("text", { x: label + cell * b + cell / 2, y: top + 15, "text-anchor": "middle" }, count));
    root.append(g);
  });
  model.peers.forEach((peer, i) => {
    const y = top + row * (i + 1);
    const g = svg("g", { "data-peer-id": peer.peer_id, "data-blocks": `${peer.start}:${peer.end}` });
    g.append(svg("text", { x: 0, y: y + 15, class: "mono" }, short(peer.peer_id)));
    const start = Math.min(peer.start, n), end = Math.min(peer.end, n);
    g.append(svg("rect", { x: label + cell * start + 1, y: y + 3, width: Math.max(cell * (end - start) - 2, 2),
                           height: row - 6, rx: 4, fill: "#5aa0ff", opacity: 0.85 }));
    g.append(svg("text", { x: label + cell * (start + end) / 2, y: y + 15, "text-anchor": "middle" },
                 `${peer.start}:${peer.end}`));
    root.append(g);
  });
  return root;
}

function compact(count) {
  // Settled compute (tokens × parameters served) grows to 10^12 and beyond: 3 significant digits.
  return Number(count).toLocaleString("en", { notation: "compact", maximumSignificantDigits: 3 });
}

function stateBadge(info) {
  // The title says why a client with a minimum stake routes around this provider (chain.records routing_refusal).
  if (!info) return el("span", { class: "muted" }, "—");
  const why = { title: info.refusal ? `no new routes: ${info.refusal}` : "clients route to it" };
  if (info.slashes > 0) return el("span", { class: "badge bad", ...why }, `slashed ×${info.slashes}`);
  if (info.open_slashes > 0) return el("span", { class: "badge bad", ...why }, "slash pending");
  if (info.state === "unbonding") {
    return el("span", { class: "badge warn", ...why }, `unbonding (stake back from block ${info.unbond_ready_at})`);
  }
  if (info.state === "registered") return el("span", { class: "badge ok", ...why }, "registered, clean");
  return el("span", { class: "badge warn", ...why }, info.state.replace("_", " "));
}

function peerTable(model, chain) {
  const head = el("tr", {}, ...["peer", "blocks", "adapters", "tokens/s", "cache free (tokens)", "rate", "chain account",
    "stake (ROC)", "earned (ROC)", "requests on chain", "tokens × params on chain", "verification"]
    .map((h) => el("th", {}, h)));
  const body = el("tbody");
  for (const peer of model.peers) {
    const info = chain && peer.chain_account ? chain.providers[peer.chain_account] : null;
    body.append(el("tr", { "data-peer-id": peer.peer_id },
      el("td", { class: "mono", title: peer.peer_id }, short(peer.peer_id)),
      el("td", { class: "blocks" }, `${peer.start}:${peer.end}`),
      el("td", { class: "num", title: peer.learning ? "live adapter version" : "frozen: serves the base model" },
         peer.learning ? `v${peer.adapter_version}` : "—"),
      el("td", { class: "num" }, peer.throughput.toFixed(1)),
      el("td", { class: "num" }, peer.cache_tokens_free.toLocaleString()),
      el("td", { class: "num" }, peer.rate),
      el("td", { class: "mono", title: peer.chain_account || "" }, short(peer.chain_account) || "—"),
      el("td", { class: "num" }, info ? tokens(info.stake) : "—"),
      el("td", { class: "num" }, info ? tokens(info.earned) : "—"),
      el("td", { class: "num" }, info ? info.requests : "—"),
      el("td", { class: "num", title: info ? String(info.tokens_x_params) : "" }, info ? compact(info.tokens_x_params) : "—"),
      el("td", {}, stateBadge(info))));
  }
  return el("table", { class: "peers" }, el("thead", {}, head), body);
}

function renderModels(data) {
  const box = document.getElementById("models");
  box.replaceChildren();
  if (data.models.length === 0) {
    box.append(el("p", { class: "muted" }, "No model is announced in this swarm yet."));
    return;
  }
  for (const model of data.models) {
    const gaps = model.coverage.filter((c) => c === 0).length;
    const summary = model.complete
      ? el("span", { class: "badge ok" }, "every block served")
      : el("span", { class: "badge bad" }, `${gaps} block(s) unserved: no route`);
    box.append(el("h2", { "data-model": model.name }, `${model.name} `,
                  el("span", { class: "muted" }, `${model.num_blocks} blocks, ${model.peers.length} peer(s) `), summary));
    box.append(coverageSvg(model));
    box.append(peerTable(model, data.chain));
  }
}

function renderChain(chain) {
  const section = document.getElementById("chain");
  if (!chain) { section.hidden = true; return; }
  section.hidden = false;
  document.getElementById("chain-url").textContent = chain.url;
  const err = document.getElementById("chain-error");
  err.hidden = chain.connected;
  err.textContent = chain.connected ? "" : `chain unreachable: ${chain.error}`;
  const settlements = document.querySelector("#settlements tbody");
  settlements.replaceChildren(...chain.settlements.map((s) => el("tr", {},
    el("td", { class: "num" }, s.block), el("td", { class: "mono" }, short(s.receipt)),
    el("td", { class: "mono" }, short(s.client)), el("td", { class: "num" }, tokens(s.amount)),
    el("td", { class: "mono" }, s.payouts.map((p) => `${short(p.provider)} ${tokens(p.amount)}`).join(", ")))));
  const slashes = document.querySelector("#slashes tbody");
  slashes.replaceChildren(...chain.slashes.map((s) => el("tr", { class: "slash" },
    el("td", { class: "num" }, s.block), el("td", { class: "mono" }, short(s.provider)),
    el("td", { class: "num" }, tokens(s.amount)), el("td", { class: "mono" }, short(s.evidence)))));
}

const CANARY_COLORS = ["#5aa0ff", "#3fb37f", "#e0a030", "#c678dd", "#56b6c2", "#e06c75"];

// One span's version tree: a node per committed version (fork sides on their own rows), an edge to its parent.
function lineageSvg(entry) {
  const versions = entry.versions;
  const numbers = [...new Set([0, ...versions.map((v) => v.version), ...versions.map((v) => v.parent)])]
    .sort((a, b) => a - b);
  const col = 150, row = 76, left = 40, top = 30;
  const rows = {};
  const place = new Map(); // "version:sha" -> {x, y}
  for (const v of versions) {
    const r = rows[v.version] = (rows[v.version] ?? -1) + 1;
    place.set(`${v.version}:${v.sha256}`, { x: left + col * numbers.indexOf(v.version), y: top + row * r, v });
  }
  const height = top + row * (Math.max(0, ...Object.values(rows)) + 1);
  const width = left + col * (numbers.length - 1) + 90;
  const root = svg("svg", { class: "lineage", viewBox: `0 0 ${width} ${height}`, width, height, role: "img",
                            "data-span": `${entry.span[0]}:${entry.span[1]}`, "data-model": entry.model });
  root.append(svg("title", {}, `Adapter versions of ${entry.model} blocks ${entry.span[0]}:${entry.span[1]}`));
  const nodeAt = (version, sha) => {
    for (const p of place.values()) if (p.v.version === version && (sha === null || p.v.sha256 === sha)) return p;
    for (const p of place.values()) if (p.v.version === version) return p;
    return null;
  };
  for (const p of place.values()) {
    const parent = nodeAt(p.v.parent, p.v.parent_sha256) || { x: left + col * numbers.indexOf(p.v.parent), y: top };
    root.append(svg("path", { class: "edge", "data-edge": `${p.v.version} ${p.v.parent}`,
                              d: `M${p.x - 16},${p.y} L${parent.x + 16},${parent.y}` }));
  }
  if (!nodeAt(0, null)) {  // the common start every replica seeds alike: never committed itself
    root.append(svg("circle", { class: "node", cx: left, cy: top, r: 15, opacity: 0.5 }));
    root.append(svg("text", { x: left, y: top + 4, "text-anchor": "middle" }, "v0"));
  }
  for (const p of place.values()) {
    const v = p.v;
    const examples = v.data_roots.reduce((n, d) => n + (d.examples || 0), 0);
    const g = svg("g", { "data-version": v.version, "data-parent": v.parent, "data-sha256": v.sha256,
                         "data-roots": v.data_roots.map((d) => d.root).join(" "), "data-fork": v.fork });
    g.append(svg("title", {}, `v${v.version} ← v${v.parent}\nsha256 ${v.sha256}\nblock ${v.block}\n` +
      `data roots:\n${v.data_roots.map((d) => `  ${d.root} (${d.examples ?? "?"} examples)`).join("\n") || "  none"}\n` +
      `replicas: ${v.replicas.join(", ")}`));
    g.append(svg("circle", { class: v.fork ? "node fork" : "node", cx: p.x, cy: p.y, r: 15 }));
    g.append(svg("text", { x: p.x, y: p.y + 4, "text-anchor": "middle" }, `v${v.version}`));
    g.append(svg("text", { x: p.x, y: p.y + 30, "text-anchor": "middle", class: "axis mono" },
                 `${v.sha256.slice(0, 12)}${v.fork ? " FORK" : ""}`));
    g.append(svg("text", { x: p.x, y: p.y + 44, "text-anchor": "middle", class: "axis" },
                 `${v.data_roots.length} root(s), ${examples} ex`));
    root.append(g);
  }
  return root;
}

// Canary loss per category after each version (the parent's "before" opens each line): a rising line is drift.
function canarySvg(entry) {
  const sides = entry.versions.filter((v) => !v.fork || v === entry.versions.find((w) => w.version === v.version));
  const categories = [...new Set(sides.flatMap((v) => Object.keys(v.canary_after)))].sort();
  if (categories.length === 0) return el("p", { class: "muted" }, "no canary losses recorded");
  const series = categories.map((c) => {
    const points = [];
    const first = sides[0];
    if (first && first.canary_before[c] !== undefined) points.push([first.parent, first.canary_before[c]]);
    for (const v of sides) if (v.canary_after[c] !== undefined) points.push([v.version, v.canary_after[c]]);
    return { category: c, points };
  });
  const xs = series.flatMap((s) => s.points.map((p) => p[0])), ys = series.flatMap((s) => s.points.map((p) => p[1]));
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1);
  const y0 = Math.min(...ys), y1 = Math.max(...ys, y0 + 1e-6);
  const w = 640, h = 180, left = 56, right = 170, top = 10, bottom = 24;
  const X = (x) => left + (w - left - right) * (x - x0) / (x1 - x0);
  const Y = (y) => top + (h - top - bottom) * (1 - (y - y0) / (y1 - y0));
  const root = svg("svg", { class: "canary", viewBox: `0 0 ${w} ${h}`, width: w, height: h, role: "img",
                            "data-span": `${entry.span[0]}:${entry.span[1]}`, "data-model": entry.model });
  root.append(svg("title", {}, `Canary loss per category by version, ${entry.model} blocks ${entry.span[0]}:${entry.span[1]}`));
  for (const y of [y0, (y0 + y1) / 2, y1]) {
    root.append(svg("line", { class: "grid", x1: left, x2: w - right, y1: Y(y), y2: Y(y) }));
    root.append(svg("text", { x: left - 6, y: Y(y) + 4, "text-anchor": "end", class: "axis" }, y.toFixed(3)));
  }
  for (let x = x0; x <= x1; x++) {
    root.append(svg("text", { x: X(x), y: h - 6, "text-anchor": "middle", class: "axis" }, `v${x}`));
  }
  series.forEach((s, i) => {
    const color = CANARY_COLORS[i % CANARY_COLORS.length];
    const rises = s.points.some((p, j) => j > 0 && p[1] > s.points[j - 1][1]);
    root.append(svg("polyline", { fill: "none", stroke: color, "stroke-width": 2, "data-category": s.category,
                                  "data-rises": rises, points: s.points.map((p) => `${X(p[0])},${Y(p[1])}`).join(" ") }));
    for (const p of s.points) root.append(svg("circle", { cx: X(p[0]), cy: Y(p[1]), r: 3, fill: color }));
    root.append(svg("text", { x: w - right + 10, y: top + 14 + 16 * i, fill: color },
                    `${s.category}${rises ? " ▲ rose" : ""}`));
  });
  return root;
}

function renderLineage(chain) {
  const section = document.getElementById("lineage");
  const spans = chain && chain.lineage ? chain.lineage : [];
  section.hidden = !chain;
  const box = document.getElementById("lineage-spans");
  box.replaceChildren();
  if (spans.length === 0) {
    box.append(el("p", { class: "muted" }, "No adapter version committed on chain yet."));
    return;
  }
  for (const entry of spans) {
    const forks = entry.versions.filter((v) => v.fork).length;
    box.append(el("h3", { "data-model": entry.model }, `${entry.model} · blocks ${entry.span[0]}:${entry.span[1]} · `,
                  `${new Set(entry.versions.map((v) => v.version)).size} version(s) `,
                  forks ? el("span", { class: "badge bad" }, "fork: two tensors committed for one version")
                        : el("span", { class: "badge ok" }, "one line of versions")));
    box.append(lineageSvg(entry));
    box.append(canarySvg(entry));
  }
}

async function refresh() {
  let delay = 2000;
  try {
    const response = await fetch("/api/swarm", { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const data = await response.json();
    delay = Math.max(500, data.refresh_s * 1000);
    planckPerToken = data.planck_per_token;
    renderModels(data);
    renderChain(data.chain);
    renderLineage(data.chain);
    const error = document.getElementById("error");
    error.hidden = !data.swarm_error;
    error.textContent = data.swarm_error ? `swarm unreachable: ${data.swarm_error}` : "";
    const status = document.getElementById("status");
    status.textContent = `updated ${new Date(data.generated_at * 1000).toLocaleTimeString()} · refresh every ${data.refresh_s}s`;
    document.body.dataset.sequence = String(data.sequence);
    document.body.dataset.refreshes = String(Number(document.body.dataset.refreshes || 0) + 1);
  } catch (e) {
    const error = document.getElementById("error");
    error.hidden = false;
    error.textContent = `dashboard server unreachable (${e.message}); retrying`;
  }
  timer = setTimeout(refresh, delay);
}

refresh();
