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
  const head = el("tr", {}, ...["peer", "blocks", "tokens/s", "cache free (tokens)", "rate", "chain account",
    "stake (ROC)", "earned (ROC)", "requests on chain", "tokens × params on chain", "verification"]
    .map((h) => el("th", {}, h)));
  const body = el("tbody");
  for (const peer of model.peers) {
    const info = chain && peer.chain_account ? chain.providers[peer.chain_account] : null;
    body.append(el("tr", { "data-peer-id": peer.peer_id },
      el("td", { class: "mono", title: peer.peer_id }, short(peer.peer_id)),
      el("td", { class: "blocks" }, `${peer.start}:${peer.end}`),
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
