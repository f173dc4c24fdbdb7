// The mezzotint web page: plain JS, no build step. Every API call goes through fetch() so
// that a --token can ride in the Authorization header (EventSource and <img src> cannot).
"use strict";
const $ = (id) => document.getElementById(id);
let info = null, running = null, inputImage = null;

function headers(json) {
  const h = json ? { "Content-Type": "application/json" } : {};
  const token = $("token").value || localStorage.getItem("mezzotint-token");
  if (token) h.Authorization = "Bearer " + token;
  return h;
}

async function api(path, options = {}) {
  const r = await fetch(path, { ...options, headers: headers(options.body !== undefined) });
  if (r.status === 401) {
    $("token-box").hidden = false;
    throw new Error("this server needs a token: enter it above");
  }
  if (!r.ok) {
    let detail = r.statusText;
    try { detail = (await r.json()).detail; } catch (e) { /* not JSON */ }
    throw new Error(`${r.status}: ${detail}`);
  }
  return r;
}

async function blobUrl(path) {
  return URL.createObjectURL(await (await api(path)).blob());
}

function mode() { return document.querySelector("input[name=mode]:checked").value; }

async function loadInfo() {
  try {
    info = await (await api("/api/v1/info")).json();
  } catch (e) { $("error").textContent = e.message; return; }
  $("model").textContent = `model ${info.model.title}`;
  $("sampler").replaceChildren(...info.samplers.map((s) => new Option(`${s.a1111} (${s.name})`, s.name)));
  const d = info.defaults;
  $("sampler").value = d.sampler; $("steps").value = d.steps; $("cfg").value = d.cfg;
  $("guidance_rescale").value = d.guidance_rescale;
  $("layout_guidance").value = d.layout_guidance ?? 0;
  $("layout_candidates").value = d.layout_candidates ?? 1;
  $("width").value = d.width; $("height").value = d.height;
}

// -- input image and mask ----------------------------------------------------------------

function setInput(dataUrl) {
  inputImage = dataUrl;
  const img = $("source");
  img.onload = () => {
    const c = $("mask");
    c.width = img.naturalWidth; c.height = img.naturalHeight;
    $("width").value = img.naturalWidth; $("height").value = img.naturalHeight;
  };
  img.src = dataUrl;
}

$("file").addEventListener("change", () => {
  const f = $("file").files[0];
  if (!f) return;
  const reader = new FileReader();
  reader.onload = () => setInput(reader.result);
  reader.readAsDataURL(f);
});

for (const r of document.querySelectorAll("input[name=mode]")) {
  r.addEventListener("change", () => {
    $("edit").hidden = mode() === "txt2img";
    $("mask-tools").hidden = $("mask").hidden = mode() !== "inpaint";
    $("strength").value = mode() === "inpaint" ? 1 : 0.75;
  });
}

(function brush() {
  const c = $("mask"), ctx = c.getContext("2d");
  let down = false, last = null;
  const at = (e) => {
    const r = c.getBoundingClientRect();
    return [(e.clientX - r.left) * c.width / r.width, (e.clientY - r.top) * c.height / r.height];
  };
  const paint = (p) => {
    ctx.strokeStyle = ctx.fillStyle = "white";
    ctx.lineCap = "round"; ctx.lineWidth = Number($("brush").value);
    ctx.beginPath(); ctx.moveTo(...(last || p)); ctx.lineTo(...p); ctx.stroke();
    last = p;
  };
  c.addEventListener("pointerdown", (e) => { down = true; last = null; paint(at(e)); });
  c.addEventListener("pointermove", (e) => { if (down) paint(at(e)); });
  window.addEventListener("pointerup", () => { down = false; last = null; });
  $("clear-mask").addEventListener("click", () => ctx.clearRect(0, 0, c.width, c.height));
})();

function maskDataUrl() {
  // white strokes on transparent -> white on black, the API's convention
  const c = $("mask"), out = document.createElement("canvas");
  out.width = c.width; out.height = c.height;
  const ctx = out.getContext("2d");
  ctx.fillStyle = "black"; ctx.fillRect(0, 0, out.width, out.height);
  ctx.drawImage(c, 0, 0);
  const px = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
  let painted = false;
  for (let i = 3; i < px.length; i += 4) if (px[i]) { painted = true; break; }
  return painted ? out.toDataURL("image/png") : null;
}

// -- jobs ---------------------------------------------------------------------------------

function request(kind) {
  const num = (id) => ($(id).value === "" ? null : Number($(id).value));
  const body = {
    kind, prompt: $("prompt").value, negative_prompt: $("negative_prompt").value,
    sampler: $("sampler").value, steps: num("steps"), cfg: num("cfg"), seed: num("seed"),
    guidance_rescale: num("guidance_rescale"), layout_guidance: num("layout_guidance"),
    layout_candidates: num("layout_candidates"),
    width: num("width"), height: num("height"), batch: kind === "explain" ? 1 : num("batch"),
  };
  if (kind === "img2img" || kind === "inpaint") {
    if (!inputImage) throw new Error("choose an input image first (a file, or 'edit' on a result)");
    body.image = inputImage; body.strength = num("strength");
  }
  if (kind === "inpaint") {
    body.mask = maskDataUrl();
    if (!body.mask) throw new Error("paint the part to regenerate on the image first");
    body.mask_blur = num("mask_blur");
  }
  return body;
}

async function follow(id) {
  // Server-Sent Events read from a fetch() stream
  const r = await api(`/api/v1/jobs/${id}/events?preview=1`);
  const reader = r.body.getReader(), dec = new TextDecoder();
  let buf = "", last = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return last;
    buf += dec.decode(value, { stream: true });
    let k;
    while ((k = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, k); buf = buf.slice(k + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5)).join("\n");
      if (!data) continue;
      last = JSON.parse(data);
      showProgress(last);
    }
  }
}

function showProgress(job) {
  $("progress").value = job.progress;
  const eta = job.eta == null ? "" : `, about ${job.eta.toFixed(1)} s left`;
  $("status").textContent = job.status === "queued" ? `queued (${job.position} ahead)`
    : job.status === "running" ? `step ${job.step} of ${job.steps}${eta}` : job.status + (job.error ? `: ${job.error}` : "");
  if (job.preview) { $("preview").src = "data:image/png;base64," + job.preview; $("preview").hidden = false; }
}

async function run(kind) {
  $("error").textContent = "";
  let body;
  try { body = request(kind); } catch (e) { $("error").textContent = e.message; return; }
  $("generate").disabled = $("xray").disabled = true;
  try {
    const job = await (await api("/api/v1/jobs", { method: "POST", body: JSON.stringify(body) })).json();
    running = job.id; $("cancel").disabled = false;
    showProgress(job);
    const end = await follow(job.id);
    if (!end || !["done", "cancelled"].includes(end.status)) {
      throw new Error(end && end.error ? end.error : "the event stream ended before the job did");
    }
    await addResults(end);
    if (kind === "explain" && end.status === "done") await showXray(end);
  } catch (e) {
    $("error").textContent = e.message;
  } finally {
    running = null;
    $("generate").disabled = $("xray").disabled = false; $("cancel").disabled = true;
  }
}

async function addResults(job) {
  for (let k = job.images.length - 1; k >= 0; k--) {
    const url = await blobUrl(job.images[k]);
    const card = document.createElement("div");
    card.className = "card"; card.dataset.kind = job.kind;
    const img = new Image(); img.src = url; img.alt = job.request.prompt;
    const params = document.createElement("pre");
    params.className = "params"; params.textContent = `${job.kind}\n${job.parameters[k]}`;
    const reuse = document.createElement("button");
    reuse.type = "button"; reuse.textContent = "reuse these settings";
    reuse.onclick = () => reuseSettings(job.request, job.seeds[k]);
    const edit = document.createElement("button");
    edit.type = "button"; edit.textContent = "edit"; edit.className = "edit";
    edit.onclick = () => editImage(url);
    card.append(img, params, reuse, edit);
    $("gallery").prepend(card);
  }
}

function reuseSettings(r, seed) {
  $("prompt").value = r.prompt; $("negative_prompt").value = r.negative_prompt;
  $("sampler").value = r.sampler; $("steps").value = r.steps; $("cfg").value = r.cfg;
  $("guidance_rescale").value = r.guidance_rescale ?? 0;
  $("layout_guidance").value = r.layout_guidance ?? 0;
  $("layout_candidates").value = r.layout_candidates ?? 1;
  $("seed").value = seed; $("width").value = r.width; $("height").value = r.height; $("batch").value = 1;
}

async function editImage(url) {
  const blob = await (await fetch(url)).blob();
  const reader = new FileReader();
  reader.onload = () => setInput(reader.result);
  reader.readAsDataURL(blob);
  if (mode() === "txt2img") document.querySelector("input[name=mode][value=img2img]").click();
}

async function showXray(job) {
  const x = await (await api(job.explain)).json();
  $("trajectory").src = await blobUrl(x.files["trajectory.webp"]);
  const figures = [];
  for (const w of x.words) {
    const fig = document.createElement("figure");
    const img = new Image(); img.src = await blobUrl(w.url); img.alt = `heat map of ${w.word}`;
    const cap = document.createElement("figcaption"); cap.textContent = w.word;
    fig.append(img, cap); figures.push(fig);
  }
  $("heatmaps").replaceChildren(...figures);
  $("xray-view").hidden = false;
}

$("form").addEventListener("submit", (e) => { e.preventDefault(); run(mode()); });
$("xray").addEventListener("click", () => run("explain"));
$("cancel").addEventListener("click", () => { if (running) api(`/api/v1/jobs/${running}/cancel`, { method: "POST" }); });
$("token").addEventListener("change", () => { localStorage.setItem("mezzotint-token", $("token").value); loadInfo(); });
$("mask").hidden = true;
loadInfo();
