"use strict";
// The synthesis page. The map is `app.grid`: a Uint8Array of h*w class ids, row-major (the canvas: the model's size,
// or a larger / non-square one up to the server's limit, sampled by a sliding window). Brush, fill, undo,
// uploads and held-out maps all write class ids into it; the canvas (one canvas pixel per map cell, scaled by CSS
// without smoothing) only shows it, and "sample" sends these exact bytes. No colour is ever read back from the
// canvas, so anti-aliasing cannot invent classes.

const app = {
  model: null, size: 0, h: 0, w: 0, zoom: 1, grid: null, lut: null, current: 0, undo: [], stroke: null,
  busy: false, heldoutIndex: -1, lastJob: null, lastResult: null, firstSampleMs: null,
};
window.svqApp = app; // for tests and the console

const $ = (id) => document.getElementById(id);
const canvas = $("canvas");
const ctx = canvas.getContext("2d");
const UNDO_DEPTH = 100;
const SETTINGS = ["num_samples", "temperature", "top_k", "top_p", "guidance_scale", "seed"];

// ---- messages and requests ------------------------------------------------------------------------------

function showMessage(text, kind = "error") {
  const box = $("message");
  box.textContent = text;
  box.className = kind;
  box.hidden = false;
}

function clearMessage() {
  $("message").hidden = true;
  $("message").textContent = "";
}

async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, options);
  } catch (e) {
    throw new Error(`the server did not answer (${e.message}); is recipes/app.py still running?`);
  }
  let body = null;
  try {
    body = await response.json();
  } catch (e) {
    body = null;
  }
  if (!response.ok) throw new Error((body && body.error) || `HTTP ${response.status} from ${path}`);
  return body;
}

function encodeIds(bytes) {
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

function decodeIds(b64, h, w) {
  const s = atob(b64);
  const out = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
  if (out.length !== h * w) throw new Error(`got a map of ${out.length} pixels, expected ${h}x${w}`);
  return out;
}

// ---- the model ------------------------------------------------------------------------------------------

async function loadInfo() {
  const info = await api("/api/info");
  $("gpt-dir").value = info.model ? info.model.gpt : info.requested || "";
  setModel(info.model);
  if (!info.model) showMessage(info.error || "no model is loaded");
  if (info.model) await loadHeldout(0, true);
}

function setModel(m) {
  app.model = m;
  for (const id of ["sample", "undo", "clear", "load-heldout", "upload"]) $(id).disabled = !m;
  if (!m) {
    $("model-summary").textContent = "no model loaded";
    return;
  }
  $("model-summary").textContent = `${m.run}: ${m.gpt_summary}; ${m.size}x${m.size} maps (canvases up to ${m.limits.canvas_side}x${m.limits.canvas_side}), ${m.palette.names.length} ${m.palette.space} classes, ${m.device}`;
  app.size = m.size;
  const select = $("canvas-size");
  select.innerHTML = "";
  for (const [h, w] of m.canvases) {
    const opt = document.createElement("option");
    opt.value = `${h}x${w}`;
    opt.textContent = h === m.size && w === m.size ? `${h}x${w} (training size)` : `${h}x${w} (sliding window)`;
    select.appendChild(opt);
  }
  // class id -> RGBA; ids outside the space white, ignore black (as the server's colorize)
  app.lut = new Uint8ClampedArray(256 * 4).fill(255);
  m.palette.colours.forEach((c, i) => app.lut.set([c[0], c[1], c[2], 255], i * 4));
  app.lut.set([0, 0, 0, 255], m.palette.ignore * 4);
  buildPalette(m.palette);
  for (const k of SETTINGS) if (k in m.defaults) $(k).value = m.defaults[k];
  $("num_samples").max = m.limits.num_samples;
  $("top_k").max = m.limits.top_k;
  app.grid = new Uint8Array(m.size * m.size);
  app.h = app.w = m.size;
  resizeCanvas();
  app.undo = [];
  app.heldoutIndex = -1;
  $("reference-figure").hidden = true;
  $("heldout-info").textContent = "";
  draw();
}

function buildPalette(pal) {
  const list = $("palette");
  list.innerHTML = "";
  const entries = pal.names.map((name, i) => [i, name, pal.colours[i]]);
  entries.push([pal.ignore, "ignore (unlabeled)", [0, 0, 0]]);
  for (const [id, name, c] of entries) {
    const li = document.createElement("li");
    li.dataset.classId = id;
    li.dataset.name = name.toLowerCase();
    li.innerHTML = `<span class="swatch"></span><span class="cid">${id}</span><span class="cname"></span>`;
    li.querySelector(".swatch").style.background = `rgb(${c[0]},${c[1]},${c[2]})`;
    li.querySelector(".cname").textContent = name;
    li.addEventListener("click", () => selectClass(id));
    list.appendChild(li);
  }
  selectClass(0);
}

function className(id) {
  const pal = app.model.palette;
  if (id === pal.ignore) return "ignore";
  return pal.names[id] || `id ${id}`;
}

function selectClass(id) {
  app.current = id;
  for (const li of $("palette").children) li.classList.toggle("selected", Number(li.dataset.classId) === id);
}

// ---- painting on the class-id grid ----------------------------------------------------------------------

// The canvas element follows app.h x app.w (one pixel per map cell), zoomed to about 512 px on its longer side.
function resizeCanvas() {
  app.zoom = Math.max(1, Math.floor(512 / Math.max(app.h, app.w)));
  canvas.width = app.w;
  canvas.height = app.h;
  canvas.style.width = `${app.w * app.zoom}px`;
  canvas.style.height = `${app.h * app.zoom}px`;
  $("canvas-size").value = `${app.h}x${app.w}`;
}

// Another canvas size: the painted cells that fit are kept, new cells repeat the nearest edge cell (a horizon
// stays a horizon). Undoable.
function setCanvasSize(h, w) {
  if (h === app.h && w === app.w) return;
  pushUndo();
  const old = app.grid, oh = app.h, ow = app.w;
  app.grid = new Uint8Array(h * w);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) app.grid[y * w + x] = old[Math.min(y, oh - 1) * ow + Math.min(x, ow - 1)];
  }
  app.h = h;
  app.w = w;
  resizeCanvas();
  draw();
}

function draw() {
  const img = ctx.createImageData(app.w, app.h);
  for (let i = 0; i < app.h * app.w; i++) img.data.set(app.lut.subarray(app.grid[i] * 4, app.grid[i] * 4 + 4), i * 4);
  ctx.putImageData(img, 0, 0);
  $("download-painted").href = canvas.toDataURL("image/png");
}

function cellAt(ev) {
  const r = canvas.getBoundingClientRect();
  return [Math.floor(((ev.clientX - r.left) * app.w) / r.width), Math.floor(((ev.clientY - r.top) * app.h) / r.height)];
}

function brushSize() {
  return Number($("brush-size").value);
}

// A round brush of odd size d = 2r + 1: cells (dx, dy) with dx^2 + dy^2 <= r (r + 1) around the centre cell.
function stamp(cx, cy) {
  const r = (brushSize() - 1) >> 1;
  const w = app.w;
  for (let dy = -r; dy <= r; dy++) {
    for (let dx = -r; dx <= r; dx++) {
      const x = cx + dx, y = cy + dy;
      if (dx * dx + dy * dy <= r * (r + 1) && inside(x, y)) app.grid[y * w + x] = app.current;
    }
  }
}

// Bresenham from (x0, y0) to (x1, y1), stamping every cell on the way (the first one too).
function strokeLine(x0, y0, x1, y1) {
  const dx = Math.abs(x1 - x0), dy = -Math.abs(y1 - y0);
  const sx = x0 < x1 ? 1 : -1, sy = y0 < y1 ? 1 : -1;
  let err = dx + dy;
  for (;;) {
    stamp(x0, y0);
    if (x0 === x1 && y0 === y1) return;
    const e2 = 2 * err;
    if (e2 >= dy) { err += dy; x0 += sx; }
    if (e2 <= dx) { err += dx; y0 += sy; }
  }
}

// 4-connected flood fill of the clicked cell's class region with the current class; false when nothing changes.
function flood(x, y) {
  const n = app.w, g = app.grid, target = g[y * n + x], value = app.current;
  if (target === value) return false;
  const stack = [y * n + x];
  g[y * n + x] = value;
  while (stack.length) {
    const i = stack.pop(), cx = i % n, cy = (i - cx) / n;
    for (const [nx, ny] of [[cx - 1, cy], [cx + 1, cy], [cx, cy - 1], [cx, cy + 1]]) {
      if (inside(nx, ny) && g[ny * n + nx] === target) {
        g[ny * n + nx] = value;
        stack.push(ny * n + nx);
      }
    }
  }
  return true;
}

// Undo entries carry their canvas size, so that undo also takes back a change of size.
function snapshot() {
  return { grid: app.grid.slice(), h: app.h, w: app.w };
}

function pushUndo(entry = snapshot()) {
  app.undo.push(entry);
  if (app.undo.length > UNDO_DEPTH) app.undo.shift();
}

function undo() {
  if (!app.undo.length) return;
  const e = app.undo.pop();
  app.grid = e.grid;
  if (e.h !== app.h || e.w !== app.w) {
    app.h = e.h;
    app.w = e.w;
    resizeCanvas();
  }
  draw();
}

// A whole new map (held-out, uploaded) of h x w ids.
function setGrid(ids, h = app.h, w = app.w) {
  pushUndo();
  app.grid = ids;
  if (h !== app.h || w !== app.w) {
    app.h = h;
    app.w = w;
    resizeCanvas();
  }
  draw();
}

function tool() {
  return document.querySelector("input[name=tool]:checked").value;
}

function inside(x, y) {
  return x >= 0 && y >= 0 && x < app.w && y < app.h;
}

canvas.addEventListener("pointerdown", (ev) => {
  if (!app.model || ev.button !== 0) return;
  ev.preventDefault();
  const [x, y] = cellAt(ev);
  if (!inside(x, y)) return;
  if (tool() === "fill") {
    const before = snapshot();
    if (flood(x, y)) {
      pushUndo(before);
      draw();
    }
    return;
  }
  pushUndo();
  canvas.setPointerCapture(ev.pointerId);
  app.stroke = [x, y];
  stamp(x, y);
  draw();
});

canvas.addEventListener("pointermove", (ev) => {
  if (!app.model) return;
  const [x, y] = cellAt(ev);
  if (inside(x, y)) {
    const id = app.grid[y * app.w + x];
    $("hover").textContent = `(${x}, ${y}): ${id} ${className(id)}`;
  }
  if (!app.stroke) return;
  const [px, py] = app.stroke;
  if (px === x && py === y) return;
  strokeLine(px, py, x, y);
  app.stroke = [x, y];
  draw();
});

for (const type of ["pointerup", "pointercancel", "lostpointercapture"]) canvas.addEventListener(type, () => (app.stroke = null));
canvas.addEventListener("pointerleave", () => ($("hover").innerHTML = "&nbsp;"));

$("brush-size").addEventListener("input", () => ($("brush-size-value").textContent = $("brush-size").value));
$("canvas-size").addEventListener("change", () => {
  const [h, w] = $("canvas-size").value.split("x").map(Number);
  setCanvasSize(h, w);
});
$("undo").addEventListener("click", undo);
$("clear").addEventListener("click", () => {
  pushUndo();
  app.grid.fill(app.current);
  draw();
});
document.addEventListener("keydown", (ev) => {
  if ((ev.ctrlKey || ev.metaKey) && ev.key === "z" && ev.target.tagName !== "INPUT") {
    ev.preventDefault();
    undo();
  }
});
$("class-filter").addEventListener("input", () => {
  const q = $("class-filter").value.trim().toLowerCase();
  for (const li of $("palette").children) li.hidden = q !== "" && !li.dataset.name.includes(q) && li.dataset.classId !== q;
});

// ---- maps from elsewhere --------------------------------------------------------------------------------

async function loadHeldout(index, quiet = false) {
  try {
    const j = await api(`/api/heldout?index=${index}`);
    setGrid(decodeIds(j.map, app.size, app.size), app.size, app.size); // held-out maps are at the model's size
    app.heldoutIndex = j.index;
    $("heldout-info").textContent = `held-out map ${j.index + 1} of ${j.count}: ${j.key}`;
    $("reference").src = j.reference;
    $("reference").width = app.size * Math.max(1, Math.floor(128 / app.size));
    $("reference-figure").hidden = false;
  } catch (e) {
    if (!quiet) showMessage(e.message);
  }
}

$("load-heldout").addEventListener("click", () => {
  clearMessage();
  loadHeldout(app.heldoutIndex + 1);
});

$("upload").addEventListener("change", async () => {
  const input = $("upload");
  const file = input.files[0];
  if (!file) return;
  clearMessage();
  try {
    const name = file.name.replace(/[^\x20-\x7e]/g, "_");
    const j = await api("/api/upload", { method: "POST", body: file, headers: { "Content-Type": "application/octet-stream", "X-Filename": name } });
    setGrid(decodeIds(j.map, j.height, j.width), j.height, j.width);
    $("reference-figure").hidden = true;
    $("heldout-info").textContent = `uploaded ${name}: classes ${j.classes.map(className).join(", ")}`;
  } catch (e) {
    showMessage(e.message);
  } finally {
    input.value = "";
  }
});

// ---- sampling -------------------------------------------------------------------------------------------

function readSettings() {
  const out = {};
  for (const k of SETTINGS) {
    const raw = $(k).value.trim();
    const v = Number(raw);
    if (raw === "" || !Number.isFinite(v)) throw new Error(`${k} must be a number, got "${raw}"`);
    out[k] = v;
  }
  return out;
}

function setBusy(busy) {
  app.busy = busy;
  $("sample").disabled = busy || !app.model;
  $("load-model").disabled = busy;
}

function showProgress(s) {
  const bar = $("progress");
  if (s.state === "queued") {
    bar.removeAttribute("value");
    $("status").textContent = `queued: ${s.ahead} request${s.ahead === 1 ? "" : "s"} ahead`;
  } else if (s.stage === "sampling") {
    bar.max = s.total;
    bar.value = s.done;
    $("status").textContent = `sampling image tokens: ${s.done} / ${s.total}`;
  } else if (s.state === "running") {
    $("status").textContent = `${s.stage}...`;
  } else if (s.state === "done") {
    bar.max = 1;
    bar.value = 1;
    $("status").textContent = `done in ${(s.elapsed_s * 1000).toFixed(0)} ms on the server`;
  } else if (s.state === "error") {
    bar.max = 1;
    bar.value = 0;
    $("status").textContent = "failed";
  }
}

function watch(job, onDone) {
  const events = new EventSource(`/api/jobs/${job}/events`);
  let finished = false;
  events.onmessage = (ev) => {
    const s = JSON.parse(ev.data);
    showProgress(s);
    if (s.state === "done" || s.state === "error") {
      finished = true;
      events.close();
      if (s.state === "error") {
        showMessage(s.error);
        setBusy(false);
      } else {
        onDone(s);
      }
    }
  };
  events.onerror = () => {
    events.close();
    if (!finished) {
      showMessage("lost the connection to the server while waiting for the result");
      setBusy(false);
    }
  };
}

async function sample() {
  if (app.busy || !app.model) return;
  clearMessage();
  const t0 = performance.now();
  let settings;
  try {
    settings = readSettings();
  } catch (e) {
    showMessage(e.message);
    return;
  }
  setBusy(true);
  $("status").textContent = "sending the map";
  try {
    const j = await api("/api/sample", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ map: encodeIds(app.grid), height: app.h, width: app.w, settings }),
    });
    app.lastJob = j.job;
    watch(j.job, (s) => showResult(j.job, s.result, t0));
  } catch (e) {
    showMessage(e.message);
    setBusy(false);
  }
}

function showResult(job, res, t0) {
  app.lastResult = res;
  const shown = Math.max(1, Math.floor(192 / app.size)) * app.w; // same scale for every canvas size
  $("understood").src = res.understood;
  $("understood").width = shown;
  $("understood-figure").hidden = false;
  $("agreement").textContent =
    res.agreement === null ? "" : `${(100 * res.agreement).toFixed(1)}% of the painted pixels kept their class`;
  const box = $("samples");
  box.innerHTML = "";
  box.dataset.job = job;
  res.samples.forEach((url, i) => {
    const img = new Image();
    img.alt = `sample ${i}`;
    img.width = shown;
    img.className = "sample";
    if (i === 0) {
      img.addEventListener("load", () => {
        const ms = performance.now() - t0;
        app.firstSampleMs = ms;
        const t = res.timings;
        $("timing").dataset.firstSampleMs = ms.toFixed(1);
        $("timing").textContent =
          `click to first sample: ${ms.toFixed(0)} ms (server: encode ${(1000 * t.encode_s).toFixed(0)} ms, ` +
          `tokens ${(1000 * t.tokens_s).toFixed(0)} ms, decode ${(1000 * t.decode_s).toFixed(0)} ms)`;
      }, { once: true });
    }
    img.src = url;
    box.appendChild(img);
  });
  const labels = {
    "settings.json": "settings and timings (JSON)",
    "painted_ids.png": "painted map (class ids)",
    "painted_map.png": "painted map (colours)",
    "understood_ids.png": "understood map (class ids)",
    "understood_map.png": "understood map (colours)",
  };
  const list = $("downloads");
  list.innerHTML = "";
  for (const [name, url] of Object.entries(res.files)) {
    const li = document.createElement("li");
    const a = document.createElement("a");
    a.href = url;
    a.download = `job${job}_${name}`;
    a.textContent = labels[name] || name;
    li.appendChild(a);
    list.appendChild(li);
  }
  setBusy(false);
}

$("settings").addEventListener("submit", (ev) => {
  ev.preventDefault();
  sample();
});
$("new-seed").addEventListener("click", () => ($("seed").value = Math.floor(Math.random() * 2 ** 31)));

$("model-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  if (app.busy) return;
  clearMessage();
  setBusy(true);
  $("status").textContent = "loading the export";
  try {
    const j = await api("/api/model", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ gpt: $("gpt-dir").value }),
    });
    watch(j.job, async () => {
      await loadInfo();
      setBusy(false);
      showMessage(`loaded ${app.model.gpt}`, "info");
    });
  } catch (e) {
    showMessage(e.message);
    setBusy(false);
  }
});

loadInfo()
  .catch((e) => showMessage(e.message))
  .finally(() => (document.body.dataset.ready = "1"));
