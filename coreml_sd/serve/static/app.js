// coreml-sd's page: plain JavaScript on the server's own API (no build step, nothing from a CDN).
// Generation goes through AUTOMATIC1111's /sdapi/v1 routes; live progress comes from the server-sent
// event stream /coreml-sd/v1/events of the request's task id.
"use strict";

const $ = (id) => document.getElementById(id);
let serverInfo = null;
let lastSeed = null;

async function api(path, options = {}) {
  const init = { method: options.method || "GET", headers: { "Content-Type": "application/json" } };
  if (options.body !== undefined) init.body = JSON.stringify(options.body);
  const response = await fetch(path, init);
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (e) { data = text; }
  if (!response.ok) throw new Error(describeError(response.status, data));
  return data;
}

function describeError(status, data) {
  const detail = data && data.detail !== undefined ? data.detail : data;
  if (Array.isArray(detail)) {
    return `${status}: ` + detail.map((d) => `${(d.loc || []).slice(1).join(".") || "request"}: ${d.msg}`).join("; ");
  }
  return `${status}: ${typeof detail === "string" ? detail : JSON.stringify(detail)}`;
}

function setStatus(text, isError = false) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("error", isError);
}

function fillSelect(select, values, selected) {
  select.replaceChildren(...values.map((v) => new Option(v, v, false, v === selected)));
}

async function loadInfo(firstTime) {
  serverInfo = await api("/coreml-sd/v1/info");
  if (firstTime) {
    fillSelect($("sampler_name"), serverInfo.samplers, serverInfo.samplers[0]);
    fillSelect($("scheduler"), serverInfo.schedulers, "automatic");
  }
  if (serverInfo.default_size) {
    $("width").value = serverInfo.default_size;
    $("height").value = serverInfo.default_size;
  }
  $("img2img").disabled = !serverInfo.img2img;
  $("img2img-reason").textContent = serverInfo.img2img ? "" : (serverInfo.img2img_reason || "");
  const models = await api("/sdapi/v1/sd-models");
  fillSelect($("model"), models.map((m) => m.title), serverInfo.model);
}

async function switchModel() {
  const title = $("model").value;
  $("model-status").textContent = `loading ${title}...`;
  try {
    await api("/sdapi/v1/options", { method: "POST", body: { sd_model_checkpoint: title } });
    await loadInfo(false);
    $("model-status").textContent = "";
  } catch (e) {
    $("model-status").textContent = e.message;
  }
}

function newTaskId() {
  const hex = Array.from({ length: 16 }, () => Math.floor(Math.random() * 16).toString(16)).join("");
  return `task(${hex})`;
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    if (!file) return resolve(null);
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function formBody() {
  const int = (id) => parseInt($(id).value, 10);
  return {
    prompt: $("prompt").value, negative_prompt: $("negative_prompt").value,
    width: int("width"), height: int("height"), steps: int("steps"), cfg_scale: parseFloat($("cfg_scale").value),
    sampler_name: $("sampler_name").value, scheduler: $("scheduler").value,
    n_iter: int("n_iter"), batch_size: 1, seed: int("seed"),
  };
}

function follow(taskId) {
  const source = new EventSource(`/coreml-sd/v1/events?task=${encodeURIComponent(taskId)}`);
  source.onmessage = (message) => {
    const e = JSON.parse(message.data);
    if (e.state === "queued") {
      setStatus(`Queued: ${e.position} ahead of this request`);
    } else if (e.state === "running") {
      $("progress").value = e.progress;
      setStatus(`Image ${e.image + 1}/${e.num_images}, step ${e.step}/${e.steps}`);
      if (e.preview) { $("preview").src = e.preview; $("preview").hidden = false; }
    } else if (e.state === "done") {
      source.close();
    }
  };
  return source;
}

async function generate(event) {
  event.preventDefault();
  const taskId = newTaskId();
  const body = { ...formBody(), force_task_id: taskId };
  let path = "/sdapi/v1/txt2img";
  const init = serverInfo && serverInfo.img2img ? await readFile($("init_image").files[0]) : null;
  if (init) {
    path = "/sdapi/v1/img2img";
    body.init_images = [init];
    body.denoising_strength = parseFloat($("denoising_strength").value);
    const mask = await readFile($("mask").files[0]);
    if (mask) body.mask = mask;
  }
  $("progress").value = 0;
  $("generate").disabled = true;
  setStatus("Sending...");
  const events = follow(taskId);
  try {
    const result = await api(path, { method: "POST", body });
    const info = showResults(result);
    $("progress").value = 1;
    const note = info.interrupted ? " (interrupted)" : "";
    setStatus(`Done: ${result.images.length} image(s)${note}` +
      (info.warnings.length ? `. Warnings: ${info.warnings.join("; ")}` : ""));
  } catch (e) {
    setStatus(e.message, true);
  } finally {
    events.close();
    $("generate").disabled = false;
  }
}

function showResults(result) {
  const info = JSON.parse(result.info);
  const saved = info.images_saved.length === result.images.length ? info.images_saved : [];
  const figures = document.createDocumentFragment();  // newest request first, its images in order
  result.images.forEach((b64, i) => {
    const dataUrl = `data:image/png;base64,${b64}`;
    const figure = document.createElement("figure");
    figure.className = "result";
    const img = new Image();
    img.src = dataUrl;
    img.alt = info.infotexts[i] || "";
    const caption = document.createElement("figcaption");
    const text = document.createElement("pre");
    text.textContent = info.infotexts[i] || "";
    const actions = document.createElement("div");
    actions.className = "actions";
    const link = document.createElement("a");
    link.textContent = "Download";
    link.className = "download";
    link.href = saved[i] ? `/coreml-sd/v1/outputs/${encodeURIComponent(saved[i])}` : dataUrl;
    link.download = saved[i] || `coreml-sd-${info.all_seeds[i]}.png`;
    const use = document.createElement("button");
    use.type = "button";
    use.className = "use-parameters";
    use.textContent = "Use parameters";
    use.onclick = () => recall(dataUrl);
    actions.append(link, use);
    caption.append(text, actions);
    figure.append(img, caption);
    figures.append(figure);
  });
  $("gallery").prepend(figures);
  if (info.all_seeds.length) lastSeed = info.all_seeds[0];
  return info;
}

async function recall(dataUrl) {
  try {
    const r = await api("/sdapi/v1/png-info", { method: "POST", body: { image: dataUrl } });
    $("png-info-text").textContent = r.info || "(this image has no generation parameters)";
    applyParameters(r.parameters);
  } catch (e) {
    $("png-info-text").textContent = e.message;
  }
}

function applyParameters(p) {
  const set = (id, key) => { if (p[key] !== undefined) $(id).value = p[key]; };
  set("prompt", "Prompt");
  set("negative_prompt", "Negative prompt");
  set("steps", "Steps");
  set("cfg_scale", "CFG scale");
  set("seed", "Seed");
  set("width", "Size-1");
  set("height", "Size-2");
  const samplers = Array.from($("sampler_name").options).map((o) => o.value);
  if (samplers.includes(p.Sampler)) $("sampler_name").value = p.Sampler;
  const schedule = (p["Schedule type"] || "automatic").toLowerCase();
  if (Array.from($("scheduler").options).some((o) => o.value === schedule)) $("scheduler").value = schedule;
}

function setupDrop() {
  const zone = $("recall");
  document.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  document.addEventListener("dragleave", () => zone.classList.remove("over"));
  document.addEventListener("drop", async (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    const file = e.dataTransfer.files[0];
    if (file) recall(await readFile(file));
  });
  $("png-info").addEventListener("change", async (e) => {
    const file = e.target.files[0];
    if (file) recall(await readFile(file));
  });
}

function setup() {
  $("form").addEventListener("submit", generate);
  $("model").addEventListener("change", switchModel);
  $("reuse-seed").addEventListener("click", () => { if (lastSeed !== null) $("seed").value = lastSeed; });
  $("random-seed").addEventListener("click", () => { $("seed").value = -1; });
  $("interrupt").addEventListener("click", () => api("/sdapi/v1/interrupt", { method: "POST" }).catch(() => {}));
  $("skip").addEventListener("click", () => api("/sdapi/v1/skip", { method: "POST" }).catch(() => {}));
  setupDrop();
  loadInfo(true).then(() => setStatus("Ready")).catch((e) => setStatus(e.message, true));
}

setup();
