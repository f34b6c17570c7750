// The seggpt-jax demo: paint prompt masks, drop queries, see overlays. Uses only the public HTTP API
// (/v1/segment, /v1/palette/N, /v1/info, /readyz); no library, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const BINARY_COLOUR = [255, 48, 48]; // overlay colour of the foreground in binary mode
const state = { tool: "brush", cls: 1, palette: [[0, 0, 0], [255, 255, 255]], prompts: [], queries: [], busy: false };

function mode() { return $("mode").value; }
function numLabels() { return mode() === "semantic" ? Math.max(1, Math.min(255, parseInt($("num-labels").value, 10) || 1)) : null; }

// ------------------------------------------------------------------------------ palette and classes
async function loadPalette() {
  const n = numLabels();
  if (n === null) { state.palette = [[0, 0, 0], [255, 255, 255]]; state.cls = 1; renderClasses(); return; }
  const reply = await fetch(`v1/palette/${n}`);
  if (!reply.ok) { showError(await errorLine(reply)); return; }
  state.palette = (await reply.json()).colours;
  state.cls = Math.min(Math.max(state.cls, 1), n);
  renderClasses();
  state.prompts.forEach(drawPrompt);
}

function renderClasses() {
  const box = $("classes");
  box.hidden = mode() !== "semantic";
  $("labels-box").hidden = mode() !== "semantic";
  box.replaceChildren();
  for (let c = 1; c < state.palette.length && mode() === "semantic"; c++) {
    const b = document.createElement("button");
    b.style.background = `rgb(${state.palette[c].join(",")})`;
    b.title = `class ${c}`;
    b.className = c === state.cls ? "on" : "";
    b.onclick = () => { state.cls = c; renderClasses(); };
    box.append(b);
  }
}

// ------------------------------------------------------------------------------ prompts
function addPrompt() {
  const index = state.prompts.length;
  const card = document.createElement("div");
  card.className = "prompt";
  card.dataset.index = index;
  card.innerHTML = `
    <div class="row"><strong>prompt ${index + 1}</strong>
      <label>image <input type="file" accept="image/*" class="prompt-image" data-testid="prompt-image-${index}"></label>
      <label>or upload its mask <input type="file" accept="image/*" class="prompt-mask" data-testid="prompt-mask-${index}"></label>
      <button class="clear">clear mask</button> <button class="remove">remove</button></div>
    <canvas class="paint" data-testid="prompt-canvas-${index}" width="1" height="1"></canvas>`;
  const prompt = { card, image: null, file: null, classes: null, maskFile: null, width: 0, height: 0 };
  state.prompts.push(prompt);
  $("prompts").append(card);
  card.querySelector(".prompt-image").onchange = (e) => e.target.files[0] && setPromptImage(prompt, e.target.files[0]);
  card.querySelector(".prompt-mask").onchange = (e) => e.target.files[0] && setPromptMask(prompt, e.target.files[0]);
  card.querySelector(".clear").onclick = () => { if (prompt.classes) { prompt.classes.fill(0); prompt.maskFile = null; drawPrompt(prompt); } };
  card.querySelector(".remove").onclick = () => { state.prompts.splice(state.prompts.indexOf(prompt), 1); card.remove(); updateButton(); };
  attachPainter(prompt, card.querySelector("canvas"));
  updateButton();
}

async function decode(file) {
  const bitmap = await createImageBitmap(file, { colorSpaceConversion: "none", imageOrientation: "from-image" });
  const canvas = document.createElement("canvas");
  canvas.width = bitmap.width; canvas.height = bitmap.height;
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(bitmap, 0, 0);
  return ctx.getImageData(0, 0, bitmap.width, bitmap.height);
}

async function setPromptImage(prompt, file) {
  try {
    prompt.image = await decode(file);
  } catch (e) { showError(`cannot read ${file.name}: not an image the browser can open`); return; }
  prompt.file = file;
  prompt.width = prompt.image.width; prompt.height = prompt.image.height;
  prompt.classes = new Uint8Array(prompt.width * prompt.height);
  prompt.maskFile = null;
  drawPrompt(prompt);
  updateButton();
}

async function setPromptMask(prompt, file) {
  if (!prompt.image) { showError("open the prompt image first, then its mask"); return; }
  let pixels;
  try { pixels = await decode(file); } catch (e) { showError(`cannot read ${file.name}`); return; }
  if (pixels.width !== prompt.width || pixels.height !== prompt.height) {
    showError(`${file.name} is ${pixels.width}x${pixels.height} but the prompt image is ${prompt.width}x${prompt.height}`);
    return;
  }
  // Shown as classes (nearest palette colour; binary: at least half as bright as the brightest pixel);
  // sent as the file itself, unless painted over.
  const d = pixels.data;
  let top = 0;
  for (let i = 0; i < d.length; i += 4) top = Math.max(top, d[i], d[i + 1], d[i + 2]);
  for (let p = 0; p < prompt.classes.length; p++) {
    const r = d[4 * p], g = d[4 * p + 1], b = d[4 * p + 2];
    if (numLabels() === null) { prompt.classes[p] = top > 0 && 2 * Math.max(r, g, b) >= top ? 1 : 0; continue; }
    let best = 0, bestDistance = Infinity;
    state.palette.forEach((c, k) => {
      const dist = (r - c[0]) ** 2 + (g - c[1]) ** 2 + (b - c[2]) ** 2;
      if (dist < bestDistance) { best = k; bestDistance = dist; }
    });
    prompt.classes[p] = best;
  }
  prompt.maskFile = file;
  drawPrompt(prompt);
}

function classColour(c) { return mode() === "binary" ? [255, 255, 255] : (state.palette[c] || [255, 255, 255]); }

function drawPrompt(prompt) {
  if (!prompt.image) return;
  const canvas = prompt.card.querySelector("canvas");
  canvas.width = prompt.width; canvas.height = prompt.height;
  const out = new ImageData(prompt.width, prompt.height);
  const src = prompt.image.data, dst = out.data;
  for (let p = 0; p < prompt.classes.length; p++) {
    const c = prompt.classes[p];
    const colour = c ? (mode() === "binary" ? BINARY_COLOUR : classColour(c)) : null;
    for (let k = 0; k < 3; k++) dst[4 * p + k] = colour ? Math.round(0.45 * src[4 * p + k] + 0.55 * colour[k]) : src[4 * p + k];
    dst[4 * p + 3] = 255;
  }
  canvas.getContext("2d").putImageData(out, 0, 0);
}

function attachPainter(prompt, canvas) {
  let last = null;
  const at = (e) => {
    const box = canvas.getBoundingClientRect();
    return [(e.clientX - box.left) * canvas.width / box.width, (e.clientY - box.top) * canvas.height / box.height];
  };
  const stamp = (x, y) => {  // a hard-edged disc: no anti-aliasing, so a mask holds class colours only
    const r = Number($("size").value) / 2, value = state.tool === "eraser" ? 0 : (mode() === "binary" ? 1 : state.cls);
    for (let j = Math.max(0, Math.floor(y - r)); j <= Math.min(prompt.height - 1, Math.ceil(y + r)); j++)
      for (let i = Math.max(0, Math.floor(x - r)); i <= Math.min(prompt.width - 1, Math.ceil(x + r)); i++)
        if ((i + 0.5 - x) ** 2 + (j + 0.5 - y) ** 2 <= r * r) prompt.classes[j * prompt.width + i] = value;
  };
  const line = (a, b) => {
    const steps = Math.max(1, Math.ceil(Math.hypot(b[0] - a[0], b[1] - a[1])));
    for (let s = 0; s <= steps; s++) stamp(a[0] + (b[0] - a[0]) * s / steps, a[1] + (b[1] - a[1]) * s / steps);
  };
  canvas.addEventListener("pointerdown", (e) => {
    if (!prompt.image) return;
    canvas.setPointerCapture(e.pointerId);
    last = at(e); line(last, last); prompt.maskFile = null; drawPrompt(prompt);
  });
  canvas.addEventListener("pointermove", (e) => {
    if (!last) return;
    const point = at(e); line(last, point); last = point; drawPrompt(prompt);
  });
  const stop = () => { last = null; };
  canvas.addEventListener("pointerup", stop);
  canvas.addEventListener("pointercancel", stop);
}

// The prompt's mask as the server reads it: 0/255 in binary mode, palette colours in semantic mode.
function promptMaskBlob(prompt) {
  if (prompt.maskFile) return Promise.resolve(prompt.maskFile);
  const canvas = document.createElement("canvas");
  canvas.width = prompt.width; canvas.height = prompt.height;
  const out = new ImageData(prompt.width, prompt.height);
  for (let p = 0; p < prompt.classes.length; p++) {
    const c = prompt.classes[p], colour = c ? classColour(c) : [0, 0, 0];
    out.data.set([colour[0], colour[1], colour[2], 255], 4 * p);
  }
  canvas.getContext("2d").putImageData(out, 0, 0);
  return new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
}

// ------------------------------------------------------------------------------ queries
function setQueries(files) {
  state.queries = Array.from(files).filter((f) => f.type.startsWith("image/") || /\.(png|jpe?g|bmp|webp|gif|tiff?)$/i.test(f.name));
  $("results").replaceChildren();
  state.queries.forEach((file, index) => {
    const card = document.createElement("div");
    card.className = "result";
    card.id = `result-${index}`;
    card.dataset.testid = `result-${index}`;
    card.innerHTML = `<div class="row"><strong class="name"></strong><span class="note muted">not segmented yet</span>
      <a class="download" hidden>download mask</a></div>
      <canvas class="base" hidden></canvas><canvas class="overlay"></canvas>`;
    card.querySelector(".name").textContent = file.name;
    $("results").append(card);
    decode(file).then((pixels) => {
      const canvas = card.querySelector(".base");
      canvas.width = pixels.width; canvas.height = pixels.height;
      canvas.getContext("2d").putImageData(pixels, 0, 0);
      const overlay = card.querySelector(".overlay");
      overlay.width = pixels.width; overlay.height = pixels.height;
      overlay.getContext("2d").putImageData(pixels, 0, 0);
    }).catch(() => { card.querySelector(".note").textContent = "the browser cannot open this image"; });
  });
  updateButton();
}

function updateButton() {
  const ready = state.prompts.some((p) => p.image) && state.queries.length > 0 && !state.busy;
  $("segment").disabled = !ready;
}

async function errorLine(reply) {
  try { return `${reply.status}: ${(await reply.json()).detail}`; } catch (e) { return `HTTP ${reply.status}`; }
}

function showError(text) { $("message").className = "error"; $("message").textContent = text; }

async function segment() {
  const prompts = state.prompts.filter((p) => p.image);
  const form = new FormData();
  state.queries.forEach((file) => form.append("query", file, file.name));
  for (const [k, prompt] of prompts.entries()) {
    form.append("prompt_image", prompt.file, prompt.file.name);
    form.append("prompt_mask", await promptMaskBlob(prompt), `prompt-${k + 1}-mask.png`);
  }
  if (numLabels() !== null) form.append("num_labels", String(numLabels()));
  state.busy = true; updateButton();
  $("message").className = "muted"; $("message").textContent = "segmenting…";
  const start = performance.now();
  try {
    const reply = await fetch("v1/segment", { method: "POST", body: form, headers: { Accept: "application/json" } });
    const seconds = (performance.now() - start) / 1000;
    $("latency").textContent = `last request ${seconds.toFixed(2)} s`;
    if (!reply.ok) { showError(await errorLine(reply)); return; }
    const { masks } = await reply.json();
    await Promise.all(masks.map((mask, index) => showMask(index, mask)));
    $("message").className = "muted";
    $("message").textContent = `${masks.length} mask${masks.length > 1 ? "s" : ""} in ${seconds.toFixed(2)} s`;
    document.body.dataset.segmented = String(Number(document.body.dataset.segmented || 0) + 1);
  } catch (e) {
    showError(`the request failed: ${e}`);
  } finally {
    state.busy = false; updateButton();
  }
}

async function showMask(index, mask) {
  const card = $(`result-${index}`);
  const bytes = Uint8Array.from(atob(mask.png_base64), (c) => c.charCodeAt(0));
  const pixels = await decode(new Blob([bytes], { type: "image/png" }));
  card.mask = { pixels, semantic: numLabels() !== null, palette: state.palette };
  const link = card.querySelector(".download");
  link.href = `data:image/png;base64,${mask.png_base64}`;
  link.download = `${mask.name.replace(/\.[^.]*$/, "") || "query"}_mask.png`;
  link.hidden = false;
  card.querySelector(".note").textContent = `${mask.width}x${mask.height}`;
  drawOverlay(card);
}

// Overlay: each foreground pixel blended with its class colour at the chosen opacity; background as is.
function drawOverlay(card) {
  if (!card.mask) return;
  const base = card.querySelector(".base"), overlay = card.querySelector(".overlay");
  const image = base.getContext("2d").getImageData(0, 0, base.width, base.height);
  const alpha = Number($("opacity").value) / 100, m = card.mask.pixels.data, d = image.data;
  for (let p = 0; p < d.length; p += 4) {
    let colour = null;
    if (card.mask.semantic) {
      const cls = card.mask.palette.findIndex((c) => c[0] === m[p] && c[1] === m[p + 1] && c[2] === m[p + 2]);
      if (cls > 0) colour = card.mask.palette[cls];
    } else if (m[p] > 127) colour = BINARY_COLOUR;
    if (colour) for (let k = 0; k < 3; k++) d[p + k] = Math.round((1 - alpha) * d[p + k] + alpha * colour[k]);
  }
  overlay.getContext("2d").putImageData(image, 0, 0);
}

// ------------------------------------------------------------------------------ status
async function poll() {
  try {
    const ready = await fetch("readyz");
    const info = await (await fetch("v1/info")).json();
    const status = $("status");
    if (ready.ok) {
      status.className = "ready";
      status.textContent = `ready: ${info.model} (${info.backend}, ${info.dtype})`;
    } else {
      status.className = info.status === "failed" ? "bad" : "";
      status.textContent = (await ready.json()).detail;
    }
    $("queue").textContent = `queue ${info.queue.depth}/${info.max_queue}, in flight ${info.in_flight}`;
  } catch (e) {
    $("status").className = "bad"; $("status").textContent = "the server does not answer";
  }
  setTimeout(poll, 1000);
}

// ------------------------------------------------------------------------------ wiring
$("mode").onchange = () => { loadPalette(); state.prompts.forEach(drawPrompt); };
$("num-labels").onchange = loadPalette;
$("brush").onclick = () => { state.tool = "brush"; $("brush").className = "on"; $("eraser").className = ""; };
$("eraser").onclick = () => { state.tool = "eraser"; $("eraser").className = "on"; $("brush").className = ""; };
$("add-prompt").onclick = addPrompt;
$("query-input").onchange = (e) => setQueries(e.target.files);
$("segment").onclick = segment;
$("opacity").oninput = () => document.querySelectorAll(".result").forEach(drawOverlay);
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); setQueries(e.dataTransfer.files); });
addPrompt();
renderClasses();
poll();
