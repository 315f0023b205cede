/**
 * The in-page half of exporter's browser runtime: onnxruntime-web (WASM backend) in a real
 * Chromium page.  driver.js (Node, playwright-core) calls, through page.evaluate:
 *
 *   exporterRunner.load({model, externalData, threads, wasmPaths})
 *       create the InferenceSession from the model's URL; returns input/output names,
 *       versions and the effective WASM settings.
 *   exporterRunner.run([url of input_0.pb, ...])
 *       fetch and decode the TensorProto inputs (tensorproto.js, shared with the Node
 *       program), run, and return every output as a base64 TensorProto in session order.
 *
 * Only exporter's local server is contacted (the driver aborts any other request).
 */
(function () {
  'use strict';
  const tp = window.tensorproto;
  let session = null;

  function toBase64(bytes) {
    let text = '';
    const chunk = 0x8000; // String.fromCharCode takes a bounded number of arguments
    for (let i = 0; i < bytes.length; i += chunk) text += String.fromCharCode.apply(null, bytes.subarray(i, i + chunk));
    return btoa(text);
  }

  async function fetchBytes(url) {
    const response = await fetch(url, { cache: 'no-store' });
    if (!response.ok) throw new Error(`GET ${url}: HTTP ${response.status}`);
    return new Uint8Array(await response.arrayBuffer());
  }

  function asTypedArray(tensor) {
    const d = tensor.data;
    if (tensor.type === 'bool' && !(d instanceof Uint8Array)) return Uint8Array.from(d, (x) => (x ? 1 : 0));
    return d;
  }

  async function load({ model, externalData, threads, wasmPaths }) {
    ort.env.wasm.wasmPaths = wasmPaths;
    ort.env.wasm.numThreads = threads;
    ort.env.wasm.proxy = false;
    ort.env.logLevel = 'error';
    const options = {
      executionProviders: ['wasm'],
      graphOptimizationLevel: 'all',
      executionMode: 'sequential',
      logSeverityLevel: 3,
    };
    if (externalData.length) options.externalData = externalData.map((f) => ({ path: f, data: new URL(f, new URL(model, location.href)).href }));
    session = await ort.InferenceSession.create(model, options);
    document.getElementById('status').textContent = 'ready';
    return {
      inputs: [...session.inputNames],
      outputs: [...session.outputNames],
      onnxruntimeWeb: ort.env.versions.web,
      userAgent: navigator.userAgent,
      threads: ort.env.wasm.numThreads,
      simd: ort.env.wasm.simd !== false,
      crossOriginIsolated: self.crossOriginIsolated === true,
    };
  }

  async function run(urls) {
    if (!session) throw new Error('no model loaded');
    const feeds = {};
    for (const [i, url] of urls.entries()) {
      const t = tp.decode(await fetchBytes(url), url.split('/').pop());
      const name = t.name || session.inputNames[i];
      if (!session.inputNames.includes(name)) {
        throw new Error(`input_${i}.pb is named '${name}', but the model's inputs are: ${session.inputNames.join(', ')}`);
      }
      feeds[name] = new ort.Tensor(t.type, t.data, t.dims);
    }
    const results = await session.run(feeds);
    const out = [];
    for (const name of session.outputNames) {
      const t = results[name];
      out.push({ name, b64: toBase64(tp.encode(name, t.type, Array.from(t.dims), asTypedArray(t))) });
      if (typeof t.dispose === 'function') t.dispose();
    }
    return out;
  }

  window.exporterRunner = { load, run };
})();
