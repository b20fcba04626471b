// A reader for NumPy .npy files (format versions 1-3, little-endian, C order): what the service answers with
// `Accept: application/x-npy`.

const MAGIC = [0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59]; // "\x93NUMPY"

const TYPES = {
  f4: Float32Array, f8: Float64Array, i1: Int8Array, u1: Uint8Array, b1: Uint8Array,
  i2: Int16Array, u2: Uint16Array, i4: Int32Array, u4: Uint32Array, i8: BigInt64Array, u8: BigUint64Array,
};

function halfToFloat(bits) {
  const sign = bits & 0x8000 ? -1 : 1;
  const exponent = (bits >> 10) & 0x1f;
  const fraction = bits & 0x3ff;
  if (exponent === 0) return sign * 2 ** -14 * (fraction / 1024);
  if (exponent === 31) return fraction ? NaN : sign * Infinity;
  return sign * 2 ** (exponent - 15) * (1 + fraction / 1024);
}

function parseHeader(text) {
  const descr = /'descr'\s*:\s*'([^']+)'/.exec(text);
  const fortran = /'fortran_order'\s*:\s*(True|False)/.exec(text);
  const shape = /'shape'\s*:\s*\(([^)]*)\)/.exec(text);
  if (!descr || !fortran || !shape) throw new Error(`not an NPY header: ${text}`);
  const dims = shape[1].split(",").map((s) => s.trim()).filter((s) => s.length).map(Number);
  return { descr: descr[1], fortran: fortran[1] === "True", shape: dims };
}

/** Parse an ArrayBuffer holding one .npy file: {dtype, shape, data} with data a typed array (float16 is
 * widened to Float32Array). Throws on anything else (big-endian, Fortran order, object arrays). */
export function parseNpy(buffer) {
  const bytes = new Uint8Array(buffer);
  if (bytes.length < 10 || MAGIC.some((b, i) => bytes[i] !== b)) throw new Error("not an NPY file (bad magic)");
  const major = bytes[6];
  const view = new DataView(buffer);
  const headerLength = major === 1 ? view.getUint16(8, true) : view.getUint32(8, true);
  const start = major === 1 ? 10 : 12;
  const header = parseHeader(new TextDecoder(major === 3 ? "utf-8" : "latin1")
    .decode(bytes.subarray(start, start + headerLength)));
  if (header.fortran) throw new Error("Fortran-ordered NPY arrays are not supported");
  const order = header.descr[0];
  const code = header.descr.slice(1);
  if (order === ">" && code !== "u1" && code !== "i1" && code !== "b1") {
    throw new Error(`big-endian NPY (${header.descr}) is not supported`);
  }
  const count = header.shape.reduce((a, b) => a * b, 1);
  const body = buffer.slice(start + headerLength); // a copy, so the typed array is aligned
  let data;
  if (code === "f2") {
    const half = new Uint16Array(body, 0, count);
    data = new Float32Array(count);
    for (let i = 0; i < count; i++) data[i] = halfToFloat(half[i]);
  } else if (TYPES[code]) {
    data = new TYPES[code](body, 0, count);
  } else {
    throw new Error(`unsupported NPY dtype ${header.descr}`);
  }
  return { dtype: header.descr, shape: header.shape, data };
}
