// The playground: a form generated from this server's /openapi.json (components.schemas.Input), one
// async POST /predictions per Generate, then GET /predictions/{id} until it is done (the gateway keeps
// coglet's webhook events for it): the denoising step while it runs, the images, seeds and timings.
// The gateway keeps the images as files that only the key may read: they are fetched with it and
// shown from blob: URLs (the page's Content-Security-Policy allows nothing else but data: URIs).

// Shown at the top; the control inputs go under "Control", the other inputs under "More settings".
const MAIN_INPUTS = ["prompt", "negative_prompt", "image", "mask", "width", "height", "num_inference_steps",
  "seed", "scheduler", "refine", "output_format"];
// The control inputs, one fieldset per group of inputs whose names share a prefix (controlnet_1_image, ...).
// A group's own input, named as its prefix (controlnet_1: the type), turns it on: while it is OFF the group's
// other inputs are disabled and left out of the request. Only the first group of each kind shows the inputs'
// descriptions (the others' are the same, their number aside): the rest have them as tooltips.
const CONTROL_GROUPS = [
  { pattern: /^(controlnet_(\d+))(_|$)/, legend: (match) => `ControlNet ${match[2]}` },
  { pattern: /^(ip_adapter)_/, legend: () => "Image prompt (IP-Adapter)" },
];
const OFF = "none";
const TEXTAREAS = ["prompt", "negative_prompt"];
const POLL_MS = 700;
const FINISHED = ["succeeded", "failed", "canceled"];
// The progress line predict.py prints per denoising step ("base: step 12/50 (t=...)").
const STEP_LINE = /^(\w+): step (\d+)\/(\d+)/;

const $ = (id) => document.getElementById(id);
let schemas = null;

function showMessage(text, isError) {
  const message = $("message");
  message.textContent = text;
  message.className = isError ? "error" : "";
}

// -- the form ---------------------------------------------------------------------------------------

function choicesOf(property) {
  const ref = property.allOf && property.allOf[0] && property.allOf[0].$ref;
  return ref ? schemas[ref.split("/").pop()].enum : property.enum;
}

function sentenceCase(words) {
  return words.charAt(0).toUpperCase() + words.slice(1).replace(/_/g, " ");
}

// A labelled form control for one input; `title` and `help` ("text" or "tooltip") default to the schema's.
function fieldFor(name, property, title, help) {
  const label = document.createElement("label");
  const text = document.createElement("span");
  text.className = "name";
  text.textContent = title || property.title || sentenceCase(name);
  label.append(text);
  const choices = choicesOf(property);
  let control;
  if (choices) {
    control = document.createElement("select");
    choices.forEach((choice) => control.add(new Option(choice, choice)));
    control.value = property.default;
  } else if (property.type === "boolean") {
    control = document.createElement("input");
    control.type = "checkbox";
    control.checked = Boolean(property.default);
  } else if (property.format === "uri") {
    control = document.createElement("input");
    control.type = "file";
    control.accept = "image/*";
  } else if (property.type === "integer" || property.type === "number") {
    control = document.createElement("input");
    control.type = "number";
    control.step = property.type === "integer" ? "1" : "any";
    if (property.minimum !== undefined) control.min = property.minimum;
    if (property.maximum !== undefined) control.max = property.maximum;
    if (property.default !== undefined && property.default !== null) control.value = property.default;
  } else {
    control = document.createElement(TEXTAREAS.includes(name) ? "textarea" : "input");
    control.value = property.default || "";
  }
  control.name = name;
  control.dataset.kind = property.format === "uri" ? "file" : property.type || "string";
  label.append(control);
  if (property.description && help === "tooltip") {
    label.title = property.description;
  } else if (property.description) {
    const description = document.createElement("span");
    description.className = "help";
    description.textContent = property.description;
    label.append(description);
  }
  return label;
}

// The group `name` belongs to: its kind (the index in CONTROL_GROUPS), prefix and legend; or null.
function controlGroupOf(name) {
  for (const [kind, group] of CONTROL_GROUPS.entries()) {
    const match = name.match(group.pattern);
    if (match) return { kind, prefix: match[1], legend: group.legend(match) };
  }
  return null;
}

// Disable a group's other inputs while its own input is OFF.
function bindGroupSwitch(fieldset, prefix) {
  const toggle = fieldset.querySelector(`[name="${prefix}"]`);
  if (!toggle) return;
  const update = () => {
    fieldset.querySelectorAll("[name]").forEach((control) => {
      if (control !== toggle) control.disabled = toggle.value === OFF;
    });
  };
  toggle.addEventListener("change", update);
  update();
}

// Each control input into its group's fieldset under "Control", made when the group's first input comes.
// `firstOfKind`: the prefix of the first group of each kind, the one that shows the descriptions.
function addControlField(name, property, group, fieldsets, firstOfKind) {
  let fieldset = fieldsets.get(group.prefix);
  if (!fieldset) {
    fieldset = document.createElement("fieldset");
    fieldset.className = "group";
    const legend = document.createElement("legend");
    legend.textContent = group.legend;
    fieldset.append(legend);
    fieldsets.set(group.prefix, fieldset);
    $("control-fields").append(fieldset);
  }
  if (!firstOfKind.has(group.kind)) firstOfKind.set(group.kind, group.prefix);
  const help = firstOfKind.get(group.kind) === group.prefix ? "text" : "tooltip";
  const rest = name.slice(group.prefix.length).replace(/^_/, "");
  const field = fieldFor(name, property, rest ? sentenceCase(rest) : "Type", help);
  if (property.type === "number" || property.type === "integer") field.classList.add("number");
  fieldset.append(field);
}

function buildForm(schema) {
  schemas = schema.components.schemas;
  const properties = schemas.Input.properties;
  const names = Object.keys(properties).sort((a, b) => properties[a]["x-order"] - properties[b]["x-order"]);
  ["fields", "control-fields", "more-fields"].forEach((id) => $(id).replaceChildren());
  const fieldsets = new Map();
  const firstOfKind = new Map();
  names.forEach((name) => {
    const group = MAIN_INPUTS.includes(name) ? null : controlGroupOf(name);
    if (group) {
      addControlField(name, properties[name], group, fieldsets, firstOfKind);
    } else {
      $(MAIN_INPUTS.includes(name) ? "fields" : "more-fields").append(fieldFor(name, properties[name]));
    }
  });
  fieldsets.forEach((fieldset, prefix) => bindGroupSwitch(fieldset, prefix));
  $("control").hidden = fieldsets.size === 0;
  $("more").hidden = $("more-fields").children.length === 0;
  $("generate").disabled = false;
}

function readAsDataUri(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

// The form as Cog input: empty and disabled fields are left out, so the server's defaults apply.
async function collectInput() {
  const input = {};
  for (const control of $("inputs").querySelectorAll("[name]")) {
    const kind = control.dataset.kind;
    if (control.disabled) continue;
    if (kind === "file") {
      if (control.files.length) input[control.name] = await readAsDataUri(control.files[0]);
    } else if (control.type === "checkbox") {
      input[control.name] = control.checked;
    } else if (control.value !== "") {
      input[control.name] = kind === "integer" || kind === "number" ? Number(control.value) : control.value;
    }
  }
  return input;
}

// -- talking to the server --------------------------------------------------------------------------

// What to tell a person about a refused request.
async function refusalText(response) {
  let body = {};
  try {
    body = await response.json();
  } catch (error) {
    body = {};
  }
  const retry = response.headers.get("Retry-After");
  switch (response.status) {
    case 401:
      return "The API key is missing or wrong: enter the key you were given above and press Use key.";
    case 409:
      return "The server is busy with another prediction: try again in a moment.";
    case 422:
      return "Some inputs are not accepted: " + (body.detail || [])
        .map((d) => `${d.loc[d.loc.length - 1]}: ${d.msg}`).join("; ");
    case 429:
    case 503:
      return (body.error || "The server is busy") + (retry ? ` (retry after ${retry} s)` : "");
    default:
      return `The server answered ${response.status}: ${body.error || body.detail || response.statusText}`;
  }
}

async function loadSchema() {
  $("generate").disabled = true;
  const response = await fetch("/openapi.json", { headers: authHeaders() });
  if (!response.ok) {
    showMessage(await refusalText(response), true);
    return;
  }
  buildForm(await response.json());
  showMessage("Fill in a prompt and press Generate.");
}

// blob: URLs of the images shown, released when the next ones replace them.
let shownBlobs = [];

// An output as something an <img> can show: a data: URI as it is, a gateway file fetched with the key.
async function imageSource(uri) {
  if (uri.startsWith("data:")) {
    return uri;
  }
  const response = await fetch(uri, { headers: authHeaders() });
  if (!response.ok) {
    throw new Error(await refusalText(response));
  }
  const blob = URL.createObjectURL(await response.blob());
  shownBlobs.push(blob);
  return blob;
}

async function showResult(prediction) {
  shownBlobs.forEach((blob) => URL.revokeObjectURL(blob));
  shownBlobs = [];
  const outputs = [].concat(prediction.output || []);
  const sources = await Promise.all(outputs.map(imageSource));
  const images = sources.map((source, index) => {
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.alt = `output ${index}`;
    img.src = source;
    const caption = document.createElement("figcaption");
    img.onload = () => { caption.textContent = `${img.naturalWidth}×${img.naturalHeight}`; };
    figure.append(img, caption);
    return figure;
  });
  $("images").replaceChildren(...images);
  const metrics = prediction.metrics || {};
  const rows = [["Seeds", (metrics.seeds || []).join(", ")]];
  Object.keys(metrics).filter((k) => k.endsWith("_time")).forEach((k) => rows.push([k, `${Number(metrics[k]).toFixed(2)} s`]));
  $("details").replaceChildren(...rows.flatMap(([term, value]) => {
    const dt = document.createElement("dt");
    dt.textContent = term;
    const dd = document.createElement("dd");
    dd.textContent = value;
    dd.id = term === "Seeds" ? "seeds" : "";
    return [dt, dd];
  }));
}

function latestStep(logs) {
  const lines = (logs || "").split("\n").map((line) => line.match(STEP_LINE)).filter(Boolean);
  return lines.length ? lines[lines.length - 1] : null;
}

function showProgress(prediction, started) {
  const seconds = ((performance.now() - started) / 1000).toFixed(0);
  const step = latestStep(prediction.logs);
  const progress = $("progress");
  if (step) {
    progress.hidden = false;
    progress.max = Number(step[3]);
    progress.value = Number(step[2]);
    showMessage(`Running… ${seconds} s, ${step[1]} step ${step[2]} of ${step[3]}`);
  } else {
    showMessage(`${prediction.status === "starting" ? "Waiting for the model" : "Running"}… ${seconds} s`);
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Follow an accepted async prediction until it is finished; null (message shown) if it cannot be read.
async function follow(accepted, started) {
  let prediction = accepted;
  while (!FINISHED.includes(prediction.status)) {
    showProgress(prediction, started);
    await sleep(POLL_MS);
    const response = await fetch(`/predictions/${encodeURIComponent(accepted.id)}`, { headers: authHeaders() });
    if (!response.ok) {
      showMessage(await refusalText(response), true);
      return null;
    }
    prediction = await response.json();
  }
  return prediction;
}

async function generate(event) {
  event.preventDefault();
  const button = $("generate");
  button.disabled = true;
  $("images").replaceChildren();
  $("details").replaceChildren();
  $("logs-box").hidden = true;
  $("progress").hidden = true;
  const started = performance.now();
  showMessage("Sending…");
  try {
    const response = await fetch("/predictions", {
      method: "POST",
      headers: { "Content-Type": "application/json", Prefer: "respond-async", ...authHeaders() },
      body: JSON.stringify({ input: await collectInput() }),
    });
    if (!response.ok) {
      showMessage(await refusalText(response), true);
      return;
    }
    const prediction = await follow(await response.json(), started);
    $("progress").hidden = true;
    if (!prediction) {
      return;
    }
    $("logs").textContent = prediction.logs || "";
    $("logs-box").hidden = !prediction.logs;
    if (prediction.status !== "succeeded") {
      showMessage(`The prediction failed: ${prediction.error || prediction.status}`, true);
      return;
    }
    await showResult(prediction);
    showMessage(`Done in ${((performance.now() - started) / 1000).toFixed(1)} s.`);
  } catch (error) {
    showMessage(`Could not reach the server: ${error.message}`, true);
  } finally {
    button.disabled = false;
  }
}

$("inputs").addEventListener("submit", generate);
bindKeyForm($("key-form"), $("key"), loadSchema);
loadSchema();
