// Calls to the gateway's API, relative to the page (so a proxy prefix keeps working), with the optional API key.
import { parseNpy } from "./npy.js";

const KEY_STORE = "ponder-api-key";

export function apiKey() {
  return sessionStorage.getItem(KEY_STORE) || "";
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY_STORE, key);
  else sessionStorage.removeItem(KEY_STORE);
}

function url(path, params) {
  const target = new URL(path, document.baseURI);
  for (const [name, value] of Object.entries(params || {})) {
    if (value !== undefined && value !== null && value !== "") target.searchParams.set(name, value);
  }
  return target;
}

/** fetch() with the API key; a non-2xx answer throws an Error carrying the problem+json detail. */
export async function call(path, { params, method = "GET", body, accept, headers = {} } = {}) {
  const all = { ...headers };
  if (accept) all.Accept = accept;
  const key = apiKey();
  if (key) all["X-API-Key"] = key;
  const response = await fetch(url(path, params), { method, body, headers: all });
  if (!response.ok) {
    let detail = response.statusText;
    try {
      const problem = await response.json();
      detail = problem.detail || JSON.stringify(problem);
    } catch (_) { /* not JSON */ }
    const error = new Error(`${response.status}: ${detail}`);
    error.status = response.status;
    throw error;
  }
  return response;
}

/** Headers X-Ponder-<Name> hold JSON for non-string values. */
export function metaHeader(response, name) {
  const text = response.headers.get(`X-Ponder-${name}`);
  if (text === null) return null;
  try {
    return JSON.parse(text);
  } catch (_) {
    return text;
  }
}

/** POST a point-cloud file as the raw body (its name tells the format) and read an NPY answer. */
export async function postCloudNpy(path, cloud, params = {}) {
  const response = await call(path, {
    method: "POST", body: cloud.blob, accept: "application/x-npy",
    headers: { "Content-Type": "application/octet-stream" }, params: { filename: cloud.name, ...params },
  });
  return { array: parseNpy(await response.arrayBuffer()), response };
}

export async function postCloudJson(path, cloud, params = {}) {
  const response = await call(path, {
    method: "POST", body: cloud.blob, accept: "application/json",
    headers: { "Content-Type": "application/octet-stream" }, params: { filename: cloud.name, ...params },
  });
  return response.json();
}

/** /v1/render with one camera: the PNG as a Blob and the answer's headers. */
export async function renderView(cloud, camera, params = {}) {
  const form = new FormData();
  form.append("file", cloud.blob, cloud.name);
  form.append("cameras", JSON.stringify(camera));
  const response = await call("v1/render", { method: "POST", body: form, accept: "image/png", params });
  return { image: await response.blob(), response };
}
