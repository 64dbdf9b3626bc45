// Operator page: polls /api/status and renders it. No framework, nothing loaded from outside.
// Data is only ever placed with textContent (never innerHTML), so a camera or class name cannot
// inject markup.
"use strict";

const REFRESH_MS = (() => {
  const n = Number(new URLSearchParams(location.search).get("refresh"));
  return Number.isFinite(n) && n >= 250 ? n : 2000;
})();
const THUMB_W = 320;
const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function fmtNum(v) {
  return typeof v === "number" ? v.toLocaleString("en-US") : "\u2013";
}
function fmtMs(v) {
  return typeof v === "number" ? v.toFixed(1) : "\u2013";
}
function fmtAge(s) {
  if (typeof s !== "number") return "\u2013";
  if (s < 90) return s.toFixed(0) + " s";
  if (s < 5400) return (s / 60).toFixed(0) + " min";
  if (s < 172800) return (s / 3600).toFixed(1) + " h";
  return (s / 86400).toFixed(1) + " d";
}
function fmtBytes(b) {
  if (typeof b !== "number") return "\u2013";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (b >= 1024 && i < units.length - 1) { b /= 1024; i++; }
  return b.toFixed(i ? 1 : 0) + " " + units[i];
}
function fmtTime(iso) {
  if (!iso) return "\u2013";
  const d = new Date(iso);
  return isNaN(d) ? iso : d.toLocaleTimeString("en-GB");
}
function upDown(up) {
  return el("span", { class: up ? "up" : "down", text: up ? "up" : "DOWN" });
}

function setCounter(id, value) {
  const node = $(id);
  node.textContent = fmtNum(value);
  node.setAttribute("data-value", String(value ?? 0));
}

function kvTable(table, rows) {
  table.replaceChildren(
    ...rows.filter((r) => r).map(([k, v]) => el("tr", {}, el("td", { text: k }), el("td", {}, v)))
  );
}

function renderHeader(s) {
  const h = s.health || {};
  $("line-name").textContent = h.line || (s.view && s.view.line) || "?";
  const state = $("line-state");
  state.textContent = s.healthy ? "running" : "degraded";
  state.className = "badge " + (s.healthy ? "badge-ok" : "badge-degraded");
  $("uptime").textContent = fmtAge(h.uptime_s);
  $("heartbeat").textContent = fmtNum(h.heartbeat);
  $("updated").textContent = new Date(s.served_at_ms).toLocaleTimeString("en-GB");
  document.title = (h.line || "line") + (s.healthy ? "" : " (DEGRADED)") + " \u2013 Edge inspection";
}

function renderAlarms(s) {
  const h = s.health || {};
  const items = [];
  for (const a of h.alarms || []) items.push(el("span", { class: "alarm", "data-alarm": a, text: a }));
  for (const p of h.problems || []) items.push(el("span", { class: "alarm", text: p }));
  for (const [name, c] of Object.entries(h.components || {})) {
    if (!c.up) items.push(el("span", { class: "alarm", text: `${name}: ${c.detail}` }));
  }
  if (!items.length) items.push(el("span", { class: "alarm none", text: "No alarms" }));
  $("alarms").replaceChildren(...items);
}

function renderTotals(v) {
  const t = (v && v.totals) || {};
  setCounter("total-parts", t.parts);
  setCounter("total-ok", t.OK);
  setCounter("total-defect", t.DEFECT);
  setCounter("total-failsafe", t.FAILSAFE_REJECT);
  setCounter("total-missed", t.missed);
  $("window-label").textContent = v ? `since start \u00b7 rates over ${v.window_s} s` : "";
}

function renderComponents(h) {
  const rows = Object.entries(h.components || {}).map(([name, c]) => [
    name,
    el("span", {}, upDown(c.up), " ", el("span", { class: "hint", text: c.detail })),
  ]);
  kvTable($("components"), rows);
}

function sideRates(label, r) {
  // Canary comparison (the canary's parts against the active model's, same period).
  if (!r || typeof r !== "object") return null;
  const pct = (v) => (typeof v === "number" ? (v * 100).toFixed(1) + " %" : "\u2013");
  return [label, `${fmtNum(r.parts)} \u00b7 defect ${pct(r.defect_rate)} \u00b7 fail-safe ${pct(r.failsafe_rate)} \u00b7 p99 ${fmtMs(r.e2e_p99_ms)} ms`];
}

function modelBlock(role, m) {
  const rows = [
    ["id", m.model || m.model_id || m.id || "?"],
    m.ready !== undefined ? ["workers ready", `${m.ready} / ${m.workers}`] : null,
    m.breaker !== undefined ? ["breaker", m.breaker] : null,
    m.per_frame_ms !== undefined ? ["per frame", fmtMs(m.per_frame_ms) + " ms"] : null,
    m.restarts_in_window !== undefined ? ["restarts (window)", fmtNum(m.restarts_in_window)] : null,
    typeof m.fraction === "number" ? ["share of parts", (m.fraction * 100).toFixed(1) + " %"] : null,
    typeof m.sample === "number" ? ["sampled", (m.sample * 100).toFixed(1) + " %"] : null,
    typeof m.frames === "number" ? ["frames compared", fmtNum(m.frames)] : null,
    typeof m.agreement === "number" ? ["agreement", (m.agreement * 100).toFixed(2) + " %"] : null,
    m.latency_ms && typeof m.latency_ms.p99 === "number" ? ["p99", fmtMs(m.latency_ms.p99) + " ms"] : null,
    sideRates("canary parts", m.canary),
    sideRates("active parts", m.canary ? m.active : undefined),
    typeof m.running_s === "number" ? ["running", fmtAge(m.running_s)] : null,
    m.last_error ? ["last error", m.last_error] : null,
  ];
  const table = el("table", { class: "kv" });
  kvTable(table, rows);
  return el("div", { "data-role": role }, el("div", { class: "role", text: role }), table);
}

function renderModels(s) {
  const h = s.health || {};
  const roles = [];
  if (h.model) roles.push(["active", h.model]);
  const extra = h.models || {};
  for (const role of ["shadow", "canary"]) {
    const m = h[role] || extra[role];
    if (m) roles.push([role, m]);
  }
  const blocks = roles.map(([r, m]) => modelBlock(r, m));
  if (extra.previous) {
    blocks.push(el("div", { class: "hint", text: "rollback to: " + extra.previous }));
  }
  const seen = (s.view && s.view.models_seen) || {};
  const ids = Object.keys(seen);
  if (ids.length > 1) {
    blocks.push(el("div", { class: "hint", text: "decided by: " + ids.map((k) => `${k} (${seen[k]})`).join(", ") }));
  }
  if (!blocks.length) blocks.push(el("div", { class: "empty", text: "no model loaded" }));
  $("models").replaceChildren(...blocks);
}

function renderRecipe(h) {
  const r = h.recipe || {};
  kvTable($("recipe"), [
    ["current", r.current === null || r.current === undefined ? "none" : String(r.current)],
    r.name ? ["name", r.name] : null,
    ["known", r.known === false ? el("span", { class: "down", text: "UNKNOWN (parts fail-safed)" }) : "yes"],
    ["selected by", r.selected_by || "\u2013"],
  ]);
}

function renderUplink(h) {
  const sp = h.spool;
  if (!sp) {
    kvTable($("uplink"), [["spool", "no data yet"]]);
    return;
  }
  const fwd = sp.forwarder || {};
  const peer = (name) =>
    typeof fwd[name + "_up"] === "boolean" ? [name, upDown(fwd[name + "_up"])] : null;
  kvTable($("uplink"), [
    ["unsent events", fmtNum(sp.unsent_events)],
    ["unsent images", fmtNum(sp.unsent_images)],
    ["oldest unsent", fmtAge(sp.oldest_unsent_age_s)],
    ["spool used", `${fmtBytes(sp.bytes_used)} of ${fmtBytes(sp.quota_bytes)} (${((sp.usage_fraction || 0) * 100).toFixed(1)} %)`],
    peer("kafka"),
    peer("s3"),
    (sp.alarms || []).length ? ["alarms", sp.alarms.join("; ")] : null,
  ]);
}

function renderPlc(h) {
  const p = h.plc_inputs;
  $("plc-card").classList.toggle("hidden", !p);
  if (!p) return;
  kvTable($("plc"), Object.entries(p).filter(([, v]) => typeof v !== "object" || v === null)
    .map(([k, v]) => [k.replaceAll("_", " "), String(v)]));
}

function renderDrift(h) {
  const d = h.drift;
  $("drift-card").classList.toggle("hidden", !d);
  if (!d) return;
  // Per camera (as /healthz drift gives it): drifting statistics, baseline, PSI, defect rate.
  const cams = d.cameras && typeof d.cameras === "object" ? d.cameras : d;
  const blocks = [];
  for (const [cam, c] of Object.entries(cams)) {
    if (!c || typeof c !== "object" || !("psi" in c || "drifting" in c)) continue;
    const drifting = c.drifting || [];
    const psi = Object.entries(c.psi || {})
      .filter(([, v]) => typeof v === "number")
      .sort((a, b) => b[1] - a[1])
      .slice(0, 4)
      .map(([k, v]) => `${k} ${v.toFixed(2)}`)
      .join(", ");
    const dr = c.defect_rate || {};
    const rate = (v) => (typeof v === "number" ? (v * 100).toFixed(1) + " %" : "\u2013");
    const table = el("table", { class: "kv" });
    kvTable(table, [
      ["state", drifting.length ? el("span", { class: "down", text: "DRIFT: " + drifting.join(", ") }) : el("span", { class: "up", text: "no drift" })],
      ["baseline", `${c.source || "?"} (${fmtNum(c.baseline_frames)} frames)`],
      psi ? ["highest PSI", psi] : null,
      "baseline" in dr || "live" in dr ? ["defect rate", `${rate(dr.baseline)} \u2192 ${rate(dr.live ?? dr.window)}`] : null,
    ]);
    blocks.push(el("div", { "data-drift-camera": cam }, el("div", { class: "role", text: cam }), table));
  }
  if (!blocks.length) blocks.push(el("pre", { class: "hint", text: JSON.stringify(d, null, 1) }));
  $("drift").replaceChildren(...blocks);
}

function mixBar(w) {
  const total = (w.OK || 0) + (w.DEFECT || 0) + (w.FAILSAFE_REJECT || 0) + (w.missed || 0);
  const bar = el("div", { class: "mix" });
  const part = (cls, n) => {
    if (!total || !n) return;
    const s = el("span", { class: cls, title: `${cls}: ${n}` });
    s.style.width = ((100 * n) / total).toFixed(2) + "%";
    bar.append(s);
  };
  part("ok", w.OK);
  part("defect", w.DEFECT);
  part("failsafe", w.FAILSAFE_REJECT);
  part("missed", w.missed);
  return bar;
}

function renderCameras(s) {
  const v = s.view || { cameras: {} };
  const h = s.health || {};
  const budget = v.budget_ms;
  const ids = [...new Set([...Object.keys(h.cameras || {}), ...Object.keys(v.cameras || {})])].sort();
  const cards = ids.map((id) => {
    const c = (v.cameras || {})[id] || { verdicts: {}, window: {}, latency_ms: {}, last: {}, failsafe_reasons: {} };
    const hc = (h.cameras || {})[id] || {};
    const w = c.window || {};
    const lat = c.latency_ms || {};
    const latCell = (label, val) => {
      const near = budget && typeof val === "number" && val > 0.85 * budget;
      return el("div", {}, el("span", { text: label }), el("b", { class: near ? "near" : "", text: fmtMs(val) }));
    };
    const reasons = Object.entries(c.failsafe_reasons || {});
    const left = el("div", {},
      mixBar(w),
      el("div", { class: "legend" },
        el("span", {}, "OK ", el("b", { text: fmtNum(w.OK || 0) })),
        el("span", {}, "defect ", el("b", { text: fmtNum(w.DEFECT || 0) })),
        el("span", {}, "fail-safe ", el("b", { text: fmtNum(w.FAILSAFE_REJECT || 0) })),
        el("span", {}, "missed ", el("b", { text: fmtNum(w.missed || 0) })),
        el("span", {}, "defect share ", el("b", { text: typeof w.defect_share === "number" ? (w.defect_share * 100).toFixed(1) + " %" : "\u2013" })),
        el("span", { class: "hint", text: `last ${v.window_s || "?"} s` })),
      el("div", { class: "lat", title: `capture to PLC acknowledgement, ms, last ${v.window_s || "?"} s` + (budget ? `; budget ${budget} ms` : "") },
        latCell("p50 ms", lat.p50), latCell("p90 ms", lat.p90), latCell("p99 ms", lat.p99), latCell("max ms", lat.max)),
      el("div", { class: "hint", text: "capture \u2192 PLC acknowledgement" + (budget ? `, budget ${budget} ms` : "") }));
    const right = el("table", { class: "kv" },
      el("tr", {}, el("td", { text: "parts (since start)" }), el("td", { "data-parts": String(c.parts || 0), text: fmtNum(c.parts || 0) })),
      el("tr", {}, el("td", { text: "frames from camera" }), el("td", { text: `${fmtNum(hc.frames)} (lost ${fmtNum(hc.missed)})` })),
      el("tr", {}, el("td", { text: "fail-safe reasons" }), el("td", { text: reasons.length ? reasons.map(([r, n]) => `${r} ${n}`).join(", ") : "none" })),
      c.last && c.last.part_id !== undefined ? el("tr", {}, el("td", { text: "last part" }), el("td", { text: `#${c.last.part_id} ${c.last.verdict} ${fmtTime(c.last.at)}` })) : null);
    const rate = typeof c.rate_per_s === "number" ? c.rate_per_s.toFixed(1) : "0";
    const card = el(
      "div",
      { class: "card camera", "data-camera": id },
      el("div", { class: "head" },
        el("h3", {}, id, " ", hc.state ? upDown(hc.state === "up") : null),
        el("span", { class: "rate", "data-rate": String(c.rate_per_s ?? 0) }, rate, el("span", { class: "hint", text: " parts/s" }))),
      el("div", { class: "body" }, left, right));
    return card;
  });
  if (!cards.length) cards.push(el("div", { class: "empty", text: "no camera data yet" }));
  $("cameras").replaceChildren(...cards);
}

const defectNodes = new Map();

function defectCard(d) {
  const img = el("img", {
    class: "defect-thumb",
    alt: `defect on ${d.camera}, part ${d.part_id}`,
    loading: "eager",
    "data-loaded": "0",
  });
  img.addEventListener("load", () => img.setAttribute("data-loaded", img.naturalWidth > 0 ? "1" : "0"));
  img.addEventListener("error", () => img.setAttribute("data-loaded", "error"));
  img.src = `${d.image}?w=${THUMB_W}`;
  const classes = d.detections.map((x) => `${x.class} ${x.score.toFixed(2)}`).join(", ");
  return el(
    "figure",
    { class: "defect-card", "data-id": d.id, "data-camera": d.camera },
    el("a", { href: d.image, target: "_blank", rel: "noopener" }, img),
    el("figcaption", {},
      el("div", { class: "cls", text: classes || d.reason }),
      el("div", { class: "hint", text: `${d.camera} \u00b7 part ${d.part_id} \u00b7 ${fmtTime(d.at)}` }),
      el("div", { class: "hint", text: `${d.model} \u00b7 recipe ${d.recipe}` + (typeof d.e2e_ms === "number" ? ` \u00b7 ${d.e2e_ms.toFixed(0)} ms` : "") }))
  );
}

function renderDefects(v) {
  const box = $("defects");
  const list = (v && v.defects) || [];
  const keep = new Set(list.map((d) => d.id));
  for (const [id, node] of defectNodes) {
    if (!keep.has(id)) { node.remove(); defectNodes.delete(id); }
  }
  // Newest first; existing cards are reused, so a thumbnail is fetched once.
  const nodes = list.map((d) => {
    let n = defectNodes.get(d.id);
    if (!n) { n = defectCard(d); defectNodes.set(d.id, n); }
    return n;
  });
  if (!nodes.length) {
    box.replaceChildren(el("div", { class: "empty", text: v ? "no defect seen yet" : "operator view not attached" }));
  } else {
    box.replaceChildren(...nodes);
  }
  $("defects-hint").textContent = v ? `last ${list.length} of ${fmtNum(v.defects_seen)} defect parts` : "";
}

function render(s) {
  const h = s.health || {};
  renderHeader(s);
  renderAlarms(s);
  renderTotals(s.view);
  renderComponents(h);
  renderModels(s);
  renderRecipe(h);
  renderUplink(h);
  renderPlc(h);
  renderDrift(h);
  renderCameras(s);
  renderDefects(s.view);
}

let refreshes = 0;
async function refresh() {
  try {
    const r = await fetch("/api/status", { cache: "no-store" });
    if (!r.ok) throw new Error("HTTP " + r.status);
    render(await r.json());
    refreshes += 1;
    document.body.setAttribute("data-refreshes", String(refreshes));
    $("conn").textContent = "";
    $("conn").className = "conn";
  } catch (e) {
    $("conn").textContent = "\u26a0 no answer from the daemon (" + e.message + ")";
    $("conn").className = "conn lost";
    $("line-state").className = "badge badge-unknown";
    $("line-state").textContent = "no data";
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}

$("refresh-s").textContent = (REFRESH_MS / 1000).toString();
refresh();
