// The 3D view: the cloud as points, detection boxes as wireframes with HTML labels, orbit controls (z up), and
// the conversion of the view's camera into the service's camera JSON (K + world_to_camera, OpenCV axes).
import * as THREE from "three";
import { OrbitControls } from "three/addons/controls/OrbitControls.js";

// Colours pass through unchanged (labels must show exactly their legend colour).
THREE.ColorManagement.enabled = false;

/** Evenly spread, well separated colours: golden-ratio hue steps with alternating lightness. */
export function paletteColor(index) {
  const hue = (index * 0.618033988749895 + 0.05) % 1;
  const lightness = index % 2 ? 0.42 : 0.58;
  const color = new THREE.Color().setHSL(hue, 0.75, lightness);
  return [color.r, color.g, color.b];
}

export function cssColor(rgb) {
  return `rgb(${rgb.map((v) => Math.round(v * 255)).join(",")})`;
}

// Box edges as corner index pairs: corners 0-3 are the bottom face, 4-7 the top face (counter-clockwise).
const EDGES = [[0, 1], [1, 2], [2, 3], [3, 0], [4, 5], [5, 6], [6, 7], [7, 4], [0, 4], [1, 5], [2, 6], [3, 7]];

export class View {
  constructor(container, overlay) {
    this.container = container;
    this.overlay = overlay;
    this.renderer = new THREE.WebGLRenderer({ antialias: false, preserveDrawingBuffer: true });
    this.renderer.outputColorSpace = THREE.LinearSRGBColorSpace;
    this.renderer.setPixelRatio(window.devicePixelRatio || 1);
    this.renderer.setClearColor(0x15171c);
    container.appendChild(this.renderer.domElement);
    this.scene = new THREE.Scene();
    this.camera = new THREE.PerspectiveCamera(50, 1, 0.01, 1000);
    this.camera.up.set(0, 0, 1);
    this.controls = new OrbitControls(this.camera, this.renderer.domElement);
    this.controls.enableDamping = false;
    this.points = null;
    this.boxes = null;
    this.labels = [];
    this.pointSize = 1;
    new ResizeObserver(() => this.resize()).observe(container);
    this.resize();
    const loop = () => {
      this.renderer.render(this.scene, this.camera);
      this.placeLabels();
      requestAnimationFrame(loop);
    };
    requestAnimationFrame(loop);
  }

  resize() {
    const width = Math.max(1, this.container.clientWidth);
    const height = Math.max(1, this.container.clientHeight);
    this.renderer.setSize(width, height, false);
    this.camera.aspect = width / height;
    this.camera.updateProjectionMatrix();
  }

  /** Remove the cloud and the boxes. */
  clear() {
    if (this.points) {
      this.scene.remove(this.points);
      this.points.geometry.dispose();
      this.points = null;
    }
    this.setBoxes([]);
  }

  /** Show a cloud: positions (D*3, display frame) and a first colour array (D*3, 0..1). */
  setCloud(positions, colors) {
    this.clear();
    const geometry = new THREE.BufferGeometry();
    geometry.setAttribute("position", new THREE.BufferAttribute(positions, 3));
    geometry.setAttribute("color", new THREE.BufferAttribute(colors, 3));
    geometry.computeBoundingSphere();
    const radius = Math.max(geometry.boundingSphere.radius, 1e-3);
    const count = positions.length / 3;
    this.baseSize = radius * 0.006 * Math.min(3, Math.sqrt(Math.max(1, 100000 / Math.max(count, 1))));
    const material = new THREE.PointsMaterial({ size: this.baseSize * this.pointSize, vertexColors: true });
    this.points = new THREE.Points(geometry, material);
    this.scene.add(this.points);
    this.frame(geometry.boundingSphere);
  }

  setPointScale(scale) {
    this.pointSize = scale;
    if (this.points) this.points.material.size = this.baseSize * scale;
  }

  setColors(colors) {
    if (!this.points) return;
    this.points.geometry.setAttribute("color", new THREE.BufferAttribute(colors, 3));
  }

  /** Look at the cloud from above one corner. */
  frame(sphere) {
    const c = sphere.center;
    const r = sphere.radius;
    const distance = r / Math.sin(THREE.MathUtils.degToRad(this.camera.fov) / 2) * 0.9;
    const direction = new THREE.Vector3(-0.55, -0.75, 0.65).normalize();
    this.camera.position.copy(c).addScaledVector(direction, distance);
    this.camera.near = Math.max(r / 1000, 1e-3);
    this.camera.far = distance + 4 * r;
    this.camera.updateProjectionMatrix();
    this.controls.target.copy(c);
    this.controls.update();
  }

  /** Boxes: [{corners: 8x[x,y,z] (display frame), color: [r,g,b], text}]. */
  setBoxes(boxes) {
    if (this.boxes) {
      this.scene.remove(this.boxes);
      this.boxes.geometry.dispose();
      this.boxes = null;
    }
    for (const label of this.labels) label.element.remove();
    this.labels = [];
    if (!boxes.length) return;
    const positions = new Float32Array(boxes.length * EDGES.length * 6);
    const colors = new Float32Array(positions.length);
    let k = 0;
    for (const box of boxes) {
      for (const [a, b] of EDGES) {
        for (const corner of [box.corners[a], box.corners[b]]) {
          positions.set(corner, k);
          colors.set(box.color, k);
          k += 3;
        }
      }
      const top = new THREE.Vector3();
      for (const corner of box.corners.slice(4)) top.add(new THREE.Vector3(...corner));
      const element = document.createElement("div");
      element.className = "box-label";
      element.textContent = box.text;
      element.style.borderColor = cssColor(box.color);
      this.overlay.appendChild(element);
      this.labels.push({ element, anchor: top.multiplyScalar(0.25) });
    }
    const geometry = new THREE.BufferGeometry();
    geometry.setAttribute("position", new THREE.BufferAttribute(positions, 3));
    geometry.setAttribute("color", new THREE.BufferAttribute(colors, 3));
    this.boxes = new THREE.LineSegments(geometry, new THREE.LineBasicMaterial({ vertexColors: true }));
    this.scene.add(this.boxes);
  }

  setBoxesVisible(visible) {
    if (this.boxes) this.boxes.visible = visible;
    this.overlay.style.display = visible ? "" : "none";
  }

  placeLabels() {
    if (!this.labels.length) return;
    const width = this.container.clientWidth;
    const height = this.container.clientHeight;
    const p = new THREE.Vector3();
    for (const { element, anchor } of this.labels) {
      p.copy(anchor).project(this.camera);
      const visible = p.z > -1 && p.z < 1 && Math.abs(p.x) <= 1.05 && Math.abs(p.y) <= 1.05;
      element.style.display = visible ? "" : "none";
      if (visible) {
        element.style.transform = `translate(${((p.x + 1) / 2) * width}px, ${((1 - p.y) / 2) * height}px) ` +
          "translate(-50%, -100%)";
      }
    }
  }

  /** The current view as a service camera (model/render/cameras.py) of the given width; the height follows
   * the view's aspect ratio. ``shift`` is what was subtracted from the cloud's coordinates for display, so
   * the camera lands in the frame the service renders in. */
  serviceCamera(width, shift) {
    const camera = this.camera;
    camera.updateMatrixWorld();
    const height = Math.max(1, Math.round(width / camera.aspect));
    // three's fov is vertical; with square pixels fx = fy. Pixel centres sit at integer coordinates.
    const f = (0.5 * height) / Math.tan(THREE.MathUtils.degToRad(camera.fov) / 2) * camera.zoom;
    const K = [[f, 0, (width - 1) / 2], [0, f, (height - 1) / 2], [0, 0, 1]];
    // OpenGL camera (x right, y up, looking down -z) -> OpenCV (x right, y down, z forward): flip y and z;
    // and undo the display shift: display = coord - shift.
    const flip = new THREE.Matrix4().makeScale(1, -1, -1);
    const unshift = new THREE.Matrix4().makeTranslation(-shift[0], -shift[1], -shift[2]);
    const w2c = flip.multiply(camera.matrixWorldInverse).multiply(unshift);
    const e = w2c.elements; // column-major
    const rows = [0, 1, 2, 3].map((r) => [0, 1, 2, 3].map((c) => e[c * 4 + r]));
    rows[3] = [0, 0, 0, 1];
    return { width, height, K, world_to_camera: rows };
  }
}
