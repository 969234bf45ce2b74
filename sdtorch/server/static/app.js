// sdtorch's page: a form, a job on /api/jobs, its event stream of previews, a gallery of results.
// Everything it loads comes from this server (see the Content-Security-Policy on /).
"use strict";

const $ = (id) => document.getElementById(id);
const SIZES = [64, 128, 256, 320, 384, 448, 512, 576, 640, 704, 768, 832, 896, 960, 1024];
const state = { config: null, job: null, source: null, initImage: null, lastSeed: null };

async function api(method, url, body) {
  const options = { method, headers: {} };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(url, options);
  let data = null;
  try { data = await response.json(); } catch (e) { data = null; }
  if (!response.ok) {
    const detail = data && data.detail ? data.detail : `${response.status} ${response.statusText}`;
    throw new Error(typeof detail === "string" ? detail : JSON.stringify(detail));
  }
  return data;
}

function message(text, isError = false) {
  const el = $("message");
  el.textContent = text;
  el.classList.toggle("error", isError);
}

function option(select, value, label, selected) {
  const o = document.createElement("option");
  o.value = value;
  o.textContent = label;
  if (selected) o.selected = true;
  select.appendChild(o);
}

function fillSchedules() {
  const sampler = state.config.samplers.find((s) => s.name === $("sampler").value);
  const select = $("schedule");
  const previous = select.value || state.config.defaults.schedule;
  select.innerHTML = "";
  for (const name of sampler ? sampler.schedules : ["uniform"]) {
    option(select, name, state.config.schedules[name] || name, name === previous);
  }
  if (!select.value) select.selectedIndex = 0;
}

async function init() {
  const config = await api("GET", "/api/config");
  state.config = config;
  $("version").textContent = config.version;
  for (const s of config.samplers) option($("sampler"), s.name, `${s.display_name} (${s.name})`, s.name === config.defaults.sampler);
  fillSchedules();
  for (const id of ["width", "height"]) {
    option($(id), "", `model's (${config.defaults[id]})`, true);
    for (const size of SIZES) option($(id), String(size), String(size), false);
  }
  for (const title of config.models) option($("model"), title, title, title === config.model);
  $("steps").value = config.defaults.steps;
  $("cfg").placeholder = `model's (${config.defaults.cfg_scale})`;
}

function numberOrNull(id) {
  const text = $(id).value.trim();
  return text === "" ? null : Number(text);
}

function requestBody() {
  const seed = numberOrNull("seed");
  const body = {
    prompt: $("prompt").value,
    negative_prompt: $("negative").value,
    sampler: $("sampler").value,
    schedule: $("schedule").value,
    steps: numberOrNull("steps"),
    cfg_scale: numberOrNull("cfg"),
    seed: seed === null || seed < 0 ? null : seed,
    width: numberOrNull("width"),
    height: numberOrNull("height"),
    batch: numberOrNull("batch"),
    model: $("model").value || null,
    full_preview_every: $("full-preview").checked ? 5 : 0,
  };
  if (state.initImage) {
    body.init_image = state.initImage;
    body.strength = Number($("strength").value);
  }
  return body;
}

function setBusy(busy) {
  $("generate").disabled = busy;
  $("interrupt").disabled = !busy;
}

function showProgress(fraction, text) {
  const percent = Math.round(Math.max(0, Math.min(1, fraction)) * 100);
  $("progress").querySelector(".bar").style.width = `${percent}%`;
  $("progress").setAttribute("aria-valuenow", String(percent));
  $("progress").querySelector(".text").textContent = text;
}

function stepText(event) {
  const parts = [`step ${event.step}/${event.total}`];
  if (event.iterations > 1) parts.push(`batch ${event.iteration + 1}/${event.iterations}`);
  parts.push(`${Math.round(event.progress * 100)}%`);
  if (event.eta !== null && event.eta !== undefined) parts.push(`ETA ${event.eta.toFixed(1)} s`);
  return parts.join(" · ");
}

async function generate(submitEvent) {
  submitEvent.preventDefault();
  if (state.job) return;
  message("");
  setBusy(true);
  showProgress(0, "submitting…");
  let job;
  try {
    job = await api("POST", "/api/jobs", requestBody());
  } catch (e) {
    setBusy(false);
    showProgress(0, "idle");
    message(e.message, true);
    return;
  }
  state.job = job.id;
  showProgress(0, job.position ? `queued (${job.position} ahead)` : "starting…");
  const source = new EventSource(job.events);
  state.source = source;
  source.addEventListener("state", (e) => {
    const event = JSON.parse(e.data);
    if (event.state === "queued") showProgress(0, `queued (${event.position || 0} ahead)`);
    else if (event.state === "running") showProgress(event.progress, event.total ? stepText(event) : "loading…");
  });
  source.addEventListener("step", (e) => {
    const event = JSON.parse(e.data);
    $("preview").src = event.preview;
    $("preview-caption").textContent = `step ${event.step}/${event.total}: ` +
      ({ full: "the prediction, decoded by the VAE", taesd: "the prediction, decoded by TAESD" }[event.preview_kind]
        || "the prediction, fast latent preview");
    showProgress(event.progress, stepText(event));
  });
  source.addEventListener("done", (e) => {
    source.close();
    finish(JSON.parse(e.data));
  });
  source.onerror = () => {
    if (source.readyState === EventSource.CLOSED && state.job === job.id) {
      finish({ state: "failed", error: "the connection to the server was lost", images: [] });
    }
  };
}

function finish(event) {
  state.job = null;
  state.source = null;
  setBusy(false);
  const seconds = event.seconds ? ` in ${event.seconds.toFixed(1)} s` : "";
  if (event.state === "failed" || event.state === "cancelled") {
    showProgress(0, event.state);
    message(event.error || event.state, true);
  } else {
    showProgress(1, `${event.state}${seconds}`);
    message(event.state === "interrupted" ? "interrupted: the last step's prediction is shown" : "");
  }
  const images = event.images || [];
  for (let i = images.length - 1; i >= 0; i--) {  // newest batch first, in its own order
    addResult(images[i], event.infotexts[i], event.parameters[i], event.partial[i]);
  }
  if (event.images && event.images.length) {
    $("preview").src = event.images[0];
    $("preview-caption").textContent = "the final picture";
    state.lastSeed = event.seeds[0];
    $("reuse-seed").disabled = false;
  }
}

function addResult(src, infotext, params, partial) {
  const figure = document.createElement("figure");
  figure.className = "result-item";
  const img = document.createElement("img");
  img.className = "result";
  img.src = src;
  img.alt = params.prompt || "result";
  const caption = document.createElement("figcaption");
  const pre = document.createElement("pre");
  pre.className = "params";
  pre.textContent = infotext;
  const actions = document.createElement("div");
  actions.className = "actions";
  const reuse = document.createElement("button");
  reuse.type = "button";
  reuse.textContent = "use seed";
  reuse.addEventListener("click", () => { $("seed").value = params.seed; });
  const again = document.createElement("button");
  again.type = "button";
  again.textContent = "use all";
  again.addEventListener("click", () => fillForm(params));
  const save = document.createElement("a");
  save.href = src;
  save.download = `sdtorch-${params.seed}.png`;
  save.textContent = "save";
  actions.append(reuse, again, save);
  if (partial) {
    const badge = document.createElement("span");
    badge.className = "badge";
    badge.textContent = "partial";
    actions.append(badge);
  }
  caption.append(pre, actions);
  figure.append(img, caption);
  $("gallery").prepend(figure);
}

function selectValue(id, value) {
  const select = $(id);
  const text = value === null || value === undefined ? "" : String(value);
  if (![...select.options].some((o) => o.value === text)) option(select, text, text, false);
  select.value = text;
}

function fillForm(fields) {
  if ("prompt" in fields) $("prompt").value = fields.prompt;
  if ("negative_prompt" in fields) $("negative").value = fields.negative_prompt;
  if ("sampler" in fields) { selectValue("sampler", fields.sampler); fillSchedules(); }
  if ("schedule" in fields) selectValue("schedule", fields.schedule);
  if ("steps" in fields) $("steps").value = fields.steps;
  if ("cfg_scale" in fields) $("cfg").value = fields.cfg_scale;
  if ("seed" in fields) $("seed").value = fields.seed;
  if ("width" in fields) selectValue("width", fields.width);
  if ("height" in fields) selectValue("height", fields.height);
  if ("strength" in fields) { $("strength").value = fields.strength; $("strength-value").textContent = Number(fields.strength).toFixed(2); }
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function dropped(event) {
  event.preventDefault();
  $("drop-overlay").hidden = true;
  const file = event.dataTransfer && event.dataTransfer.files[0];
  if (!file) return;
  try {
    const result = await api("POST", "/api/parameters", { image: await readFile(file) });
    fillForm(result.fields);
    message(`filled from ${file.name}`);
  } catch (e) {
    message(`${file.name}: ${e.message}`, true);
  }
}

async function chooseInit() {
  const file = $("init-image").files[0];
  if (!file) return;
  state.initImage = await readFile(file);
  $("init-thumb").src = state.initImage;
  $("init-thumb").hidden = false;
  $("clear-init").hidden = false;
}

function clearInit() {
  state.initImage = null;
  $("init-image").value = "";
  $("init-thumb").hidden = true;
  $("clear-init").hidden = true;
}

document.addEventListener("DOMContentLoaded", () => {
  $("form").addEventListener("submit", generate);
  $("interrupt").addEventListener("click", () => {
    if (state.job) api("DELETE", `/api/jobs/${state.job}`).catch((e) => message(e.message, true));
  });
  $("sampler").addEventListener("change", fillSchedules);
  $("random-seed").addEventListener("click", () => { $("seed").value = -1; });
  $("reuse-seed").addEventListener("click", () => { if (state.lastSeed !== null) $("seed").value = state.lastSeed; });
  $("strength").addEventListener("input", () => { $("strength-value").textContent = Number($("strength").value).toFixed(2); });
  $("init-image").addEventListener("change", chooseInit);
  $("clear-init").addEventListener("click", clearInit);
  document.addEventListener("dragover", (e) => { e.preventDefault(); $("drop-overlay").hidden = false; });
  document.addEventListener("dragleave", (e) => { if (!e.relatedTarget) $("drop-overlay").hidden = true; });
  document.addEventListener("drop", dropped);
  init().catch((e) => message(`cannot reach the server: ${e.message}`, true));
});
