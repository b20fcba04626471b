// The viewer page: load a cloud (upload or the bundled sample), then colour it by segmentation, draw detection
// boxes, colour it by feature PCA, and render a novel view from the current camera, all through the gateway.
import { apiKey, call, metaHeader, postCloudJson, postCloudNpy, renderView, setApiKey } from "./api.js";
import { View, cssColor, paletteColor } from "./scene.js";

const MAX_DISPLAY = 200000;
const $ = (id) => document.getElementById(id);
const view = new View($("stage"), $("overlay"));
const state = {
  cloud: null, // {blob, name}
  generation: 0, // bumps on every new cloud: answers for an older cloud are dropped
  numPoints: 0,
  rows: null, // shown point -> input row
  shown: [], // shown point -> display row (display rows without coordinates are not shown)
  shift: [0, 0, 0], // display = coord - shift (the service's coordinate frame)
  offset: [0, 0, 0], // display = world - offset (world = coord + origin; boxes are in world)
  colors: {}, // mode -> Float32Array (D*3)
  classIndex: new Map(), // class name -> palette index
  capable: null, // capabilities some served model has (null: unknown, all buttons allowed)
};
const ACTIONS = { segment: "segment", detect: "detect", pca: "features", render: "render" }; // button -> capability

function can(button) {
  return !state.capable || state.capable.has(ACTIONS[button]);
}

function enableActions() {
  for (const id of Object.keys(ACTIONS)) $(id).disabled = !state.rows || !can(id);
}
window.viewer = { state, view }; // for the browser tests and the console

function setStatus(text, kind) {
  const status = $("status");
  status.textContent = text;
  status.dataset.state = kind;
}

/** Run one action with its button disabled, the elapsed time and any error in the status line. */
async function task(button, label, action) {
  const generation = state.generation;
  if (button) button.disabled = true;
  setStatus(`${label}…`, "busy");
  const start = performance.now();
  try {
    const note = await action(() => generation !== state.generation);
    setStatus(`${note || label + " done"} (${((performance.now() - start) / 1000).toFixed(1)} s)`, "done");
  } catch (error) {
    console.warn(`${label} failed`, error);
    setStatus(`${label} failed: ${error.message}`, "error");
  } finally {
    if (button) enableActions();
  }
}

function classColor(name) {
  if (!state.classIndex.has(name)) {
    let hash = 7;
    for (const ch of name) hash = (hash * 31 + ch.charCodeAt(0)) % 9973;
    return paletteColor(40 + hash);
  }
  return paletteColor(state.classIndex.get(name));
}

function setClasses(names) {
  state.classIndex = new Map(names.map((name, i) => [name, i]));
}

function setMode(mode) {
  const radio = document.querySelector(`input[name=mode][value=${mode}]`);
  radio.disabled = false;
  radio.checked = true;
  view.setColors(state.colors[mode]);
}

function fillModelSelect(select, models, capability) {
  select.replaceChildren(new Option("default model", ""));
  for (const model of models.filter((m) => m.capabilities.includes(capability))) {
    select.append(new Option(model.name, model.name));
  }
}

async function loadModels() {
  try {
    const answer = await (await call("v1/models", { accept: "application/json" })).json();
    fillModelSelect($("segment-model"), answer.models, "segment");
    fillModelSelect($("detect-model"), answer.models, "detect");
    fillModelSelect($("features-model"), answer.models, "features");
    fillModelSelect($("render-model"), answer.models, "render");
    const segmentor = answer.models.find((m) => m.default && m.capabilities.includes("segment")) ||
      answer.models.find((m) => m.capabilities.includes("segment"));
    if (segmentor) {
      const names = segmentor.classes[segmentor.default_condition] || Object.values(segmentor.classes)[0];
      if (names) setClasses(names);
    }
    state.capable = new Set(answer.models.flatMap((m) => m.capabilities));
    for (const id of Object.keys(ACTIONS)) $(id).title = can(id) ? "" : `no served model can ${ACTIONS[id]}`;
    enableActions();
  } catch (error) {
    setStatus(`cannot list the models: ${error.message}${error.status === 401 ? " (set the API key below)" : ""}`,
      "error");
  }
}

async function loadCloud(blob, name) {
  state.generation += 1;
  state.cloud = { blob, name };
  state.rows = null; // until the new cloud is shown, nothing may be asked about it
  state.colors = {};
  enableActions();
  for (const radio of document.querySelectorAll("input[name=mode]")) radio.disabled = radio.value !== "input";
  $("legend").replaceChildren();
  $("boxes").replaceChildren();
  $("box-count").textContent = "0";
  $("box-count").dataset.count = "0";
  $("pca-info").textContent = "";
  $("render-figure").hidden = true;
  await task(null, `Loading ${name}`, async (stale) => {
    const { array, response } = await postCloudNpy("v1/viewer/points", state.cloud, { max_points: MAX_DISPLAY });
    if (stale()) return "stale answer dropped";
    const count = array.shape[0];
    const numPoints = metaHeader(response, "Num-Points");
    // Display rows floor(i * N / count) over the input order; rows without coordinates (NaN: the holes of an
    // organised depth-camera cloud) are left out, so shown point j is display row state.shown[j].
    const shown = [];
    for (let i = 0; i < count; i++) if (Number.isFinite(array.data[i * 6])) shown.push(i);
    const positions = new Float32Array(shown.length * 3);
    const colors = new Float32Array(shown.length * 3);
    state.rows = new Float64Array(shown.length);
    shown.forEach((i, j) => {
      for (let k = 0; k < 3; k++) {
        positions[j * 3 + k] = array.data[i * 6 + k];
        colors[j * 3 + k] = array.data[i * 6 + 3 + k];
      }
      state.rows[j] = Math.floor((i * numPoints) / count);
    });
    state.shown = shown;
    const offset = metaHeader(response, "Offset");
    const origin = metaHeader(response, "Origin");
    state.numPoints = numPoints;
    state.offset = offset;
    state.shift = offset.map((v, k) => v - origin[k]);
    state.colors.input = colors;
    view.setCloud(positions, colors);
    setMode("input");
    const info = $("cloud-info");
    const holes = count - shown.length;
    info.textContent = `${name}: ${numPoints.toLocaleString()} points` +
      (shown.length < numPoints ? ` (${shown.length.toLocaleString()} shown)` : "") +
      (holes ? `, ${holes.toLocaleString()} of the display rows without coordinates` : "") +
      (metaHeader(response, "Has-Color") === false ? ", no colours" : "");
    info.dataset.points = String(numPoints);
    info.dataset.shown = String(shown.length);
    enableActions();
    return `Loaded ${name}`;
  });
  if (!state.rows) {
    $("cloud-info").textContent = `${name} could not be shown (see below).`;
    view.clear();
    return;
  }
  if ($("auto").checked) {
    if (can("segment")) await segment();
    if (can("detect")) await detect();
  }
}

async function segment() {
  await task($("segment"), "Segmentation", async (stale) => {
    const { array, response } = await postCloudNpy("v1/segment", state.cloud, { model: $("segment-model").value });
    if (stale()) return "stale answer dropped";
    const names = metaHeader(response, "Class-Names");
    if (Array.isArray(names)) setClasses(names);
    const byIndex = [...state.classIndex.entries()].sort((a, b) => a[1] - b[1]).map((e) => e[0]);
    const labels = array.data;
    const count = state.rows.length;
    const colors = new Float32Array(count * 3);
    const counts = new Map();
    for (let i = 0; i < count; i++) {
      const label = labels[state.rows[i]];
      counts.set(label, (counts.get(label) || 0) + 1);
      colors.set(paletteColor(label), i * 3);
    }
    state.colors.segment = colors;
    setMode("segment");
    const legend = $("legend");
    legend.replaceChildren();
    for (const [label, n] of [...counts.entries()].sort((a, b) => b[1] - a[1])) {
      const item = document.createElement("li");
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = cssColor(paletteColor(label));
      item.append(swatch, `${byIndex[label] ?? "class " + label} `);
      const share = document.createElement("span");
      share.className = "share";
      const percent = (100 * n) / count;
      share.textContent = percent < 0.1 ? "< 0.1 %" : `${percent.toFixed(1)} %`;
      item.append(share);
      item.dataset.label = String(label);
      legend.append(item);
    }
    return `Segmented: ${counts.size} classes (model ${metaHeader(response, "Model")})`;
  });
}

async function detect() {
  await task($("detect"), "Detection", async (stale) => {
    const answer = await postCloudJson("v1/detect", state.cloud, {
      model: $("detect-model").value, score_threshold: $("score").value,
    });
    if (stale()) return "stale answer dropped";
    const boxes = answer.detections.map((d) => ({
      corners: d.corners.map((c) => c.map((v, k) => v - state.offset[k])),
      color: classColor(d.label),
      text: `${d.label} ${d.score.toFixed(2)}`,
    }));
    view.setBoxes(boxes);
    view.setBoxesVisible($("show-boxes").checked);
    const list = $("boxes");
    list.replaceChildren();
    for (const box of boxes) {
      const item = document.createElement("li");
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = cssColor(box.color);
      item.append(swatch, box.text);
      list.append(item);
    }
    $("box-count").textContent = String(boxes.length);
    $("box-count").dataset.count = String(boxes.length);
    return `Detected ${boxes.length} boxes (model ${answer.model})`;
  });
}

async function featurePca() {
  await task($("pca"), "Feature PCA", async (stale) => {
    const { array, response } = await postCloudNpy("v1/viewer/pca", state.cloud, {
      model: $("features-model").value, max_points: MAX_DISPLAY,
    });
    if (stale()) return "stale answer dropped";
    const colors = new Float32Array(state.shown.length * 3); // the answer has every display row: pick the shown
    state.shown.forEach((i, j) => {
      for (let k = 0; k < 3; k++) colors[j * 3 + k] = array.data[i * 3 + k] / 255;
    });
    state.colors.pca = colors;
    setMode("pca");
    const explained = metaHeader(response, "Explained-Variance") || [];
    $("pca-info").textContent = "explained variance: " + explained.map((v) => `${(100 * v).toFixed(1)} %`).join(", ");
    return `Feature PCA (model ${metaHeader(response, "Model")})`;
  });
}

async function render() {
  await task($("render"), "Rendering", async () => {
    const camera = view.serviceCamera(Number($("render-width").value), state.shift);
    const { image, response } = await renderView(state.cloud, camera, { model: $("render-model").value });
    const img = $("render-image");
    if (img.src) URL.revokeObjectURL(img.src);
    img.src = URL.createObjectURL(image);
    $("render-figure").hidden = false;
    await img.decode();
    const hit = Number(response.headers.get("X-Ponder-Hit-Fraction") || 0);
    $("render-caption").textContent = `rendered ${camera.width}×${camera.height} px, ` +
      `${(100 * hit).toFixed(0)} % of rays hit`;
    state.lastCamera = camera;
    return `Rendered ${camera.width}×${camera.height}`;
  });
}

$("file").addEventListener("change", (event) => {
  const file = event.target.files[0];
  if (file) loadCloud(file, file.name);
});
$("sample").addEventListener("click", async () => {
  try {
    const response = await fetch(new URL("static/samples/room.npz", document.baseURI));
    if (!response.ok) throw new Error(`${response.status} ${response.statusText}`);
    await loadCloud(await response.blob(), "room.npz");
  } catch (error) {
    setStatus(`cannot load the sample: ${error.message}`, "error");
  }
});
$("segment").addEventListener("click", segment);
$("detect").addEventListener("click", detect);
$("pca").addEventListener("click", featurePca);
$("render").addEventListener("click", render);
$("render-close").addEventListener("click", () => { $("render-figure").hidden = true; });
$("show-boxes").addEventListener("change", (event) => view.setBoxesVisible(event.target.checked));
$("point-size").addEventListener("input", (event) => view.setPointScale(Number(event.target.value)));
for (const radio of document.querySelectorAll("input[name=mode]")) {
  radio.addEventListener("change", () => view.setColors(state.colors[radio.value]));
}
$("api-key").value = apiKey();
$("api-key").addEventListener("change", (event) => {
  setApiKey(event.target.value.trim());
  loadModels();
});
loadModels();
