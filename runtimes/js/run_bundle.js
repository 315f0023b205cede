#!/usr/bin/env node
'use strict';
/**
 * exporter's Node.js consumer: run an exporter bundle (or any ONNX model-zoo style
 * directory) in onnxruntime-node and compare with the stored outputs.
 *
 * Usage:
 *   node run_bundle.js verify BUNDLE [--atol X] [--rtol Y] [--threads N] [--dump DIR] [--no-hashes]
 *       Run model.onnx on every BUNDLE/test_data_set_<k>/input_<i>.pb and compare with
 *       output_<i>.pb.  Prints one JSON report (the schema of exporter's parity.json,
 *       "format": "exporter-parity") on stdout.  --dump DIR also writes this runtime's raw
 *       outputs as DIR/test_data_set_<k>/output_<i>.pb so Python can compare them itself.
 *   node run_bundle.js run MODEL.onnx INPUT_DIR OUTPUT_DIR [--threads N]
 *       Run once on INPUT_DIR/input_<i>.pb; write OUTPUT_DIR/output_<i>.pb (session output
 *       order); print {"ok": true, "outputs": [...]}.
 *   node run_bundle.js serve MODEL.onnx [--threads N]
 *       Load once, then answer JSON lines on stdin {"id": 1, "inputs": DIR, "outputs": DIR}
 *       with JSON lines {"id": 1, "ok": true, "outputs": [...]} (or "ok": false, "error").
 *       The first line written is {"ready": true, "inputs": [...], "outputs": [...]}.
 *   node run_bundle.js info MODEL.onnx
 *       Print the model's input/output names and the versions in use.
 *
 * Tolerances (verify): an element passes when |c - r| <= atol + rtol * |r| (float64);
 * integer and bool outputs are compared exactly; NaN/Inf must match exactly.  atol/rtol
 * per output come from manifest.json only ("tolerances": "per_output", then "defaults" by
 * dtype): exporter writes every default there, so this program keeps no copy of its own
 * that could drift.  --atol / --rtol replace each half; a directory without a manifest
 * (or an output the manifest has no tolerance for) needs both.
 * This mirrors exporter.parity.compare; Python's `exporter verify --runtime node` does
 * not rely on it (it compares this runtime's raw outputs itself).
 *
 * Exit codes: 0 pass, 1 verification failed, 2 bad usage or bad input (message on stderr;
 * for verify also a JSON {"ok": false, "error": ...} on stdout).
 */

const fs = require('fs');
const path = require('path');
const crypto = require('crypto');
const readline = require('readline');
const tp = require('./tensorproto');

const INSTALL = 'cd runtimes/js && npm ci --ignore-scripts   (or: npm install --ignore-scripts onnxruntime-node@1.30.0)';
// Smallest normal number per float dtype: the lowest floor of max_rel's denominator.
const TINY = {
  float64: 2.2250738585072014e-308,
  float32: 1.1754943508222875e-38,
  bfloat16: 1.1754943508222875e-38,
  float16: 6.103515625e-5,
};
const EXACT = new Set(['int8', 'int16', 'int32', 'int64', 'uint8', 'uint16', 'uint32', 'uint64', 'bool']);

class UsageError extends Error {}

function loadOrt() {
  try {
    return require('onnxruntime-node');
  } catch (e) {
    throw new UsageError(`onnxruntime-node is not installed (${e.message.split('\n')[0]}); install it with: ${INSTALL}`);
  }
}

function parseArgs(argv) {
  const positional = [];
  const opts = { atol: null, rtol: null, threads: null, dump: null, hashes: true };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const value = () => {
      if (i + 1 >= argv.length) throw new UsageError(`${a} needs a value`);
      return argv[++i];
    };
    const number = (what) => {
      const v = Number(value());
      if (!Number.isFinite(v) || v < 0) throw new UsageError(`${what} must be a finite number >= 0`);
      return v;
    };
    if (a === '--atol') opts.atol = number('--atol');
    else if (a === '--rtol') opts.rtol = number('--rtol');
    else if (a === '--threads') {
      const v = Number(value());
      if (!Number.isInteger(v) || v < 1) throw new UsageError('--threads must be a positive integer');
      opts.threads = v;
    } else if (a === '--dump') opts.dump = value();
    else if (a === '--no-hashes') opts.hashes = false;
    else if (a.startsWith('--')) throw new UsageError(`unknown option ${a}`);
    else positional.push(a);
  }
  return { positional, opts };
}

async function createSession(ort, modelPath, threads) {
  if (!fs.existsSync(modelPath) || !fs.statSync(modelPath).isFile()) {
    throw new UsageError(`ONNX file ${modelPath} does not exist or is not a file`);
  }
  const options = {
    executionProviders: ['cpu'],
    graphOptimizationLevel: 'all',
    executionMode: 'sequential',
    interOpNumThreads: 1,
    logSeverityLevel: 3,
  };
  if (threads) options.intraOpNumThreads = threads;
  try {
    return await ort.InferenceSession.create(path.resolve(modelPath), options);
  } catch (e) {
    throw new UsageError(`onnxruntime-node cannot load ${modelPath}: ${e.message}`);
  }
}

function numbered(dir, prefix) {
  const re = new RegExp(`^${prefix}_(\\d+)\\.pb$`);
  return fs
    .readdirSync(dir)
    .map((f) => [f, re.exec(f)])
    .filter(([, m]) => m)
    .sort((a, b) => Number(a[1][1]) - Number(b[1][1]))
    .map(([f]) => path.join(dir, f));
}

function readTensors(dir, prefix) {
  if (!fs.existsSync(dir) || !fs.statSync(dir).isDirectory()) throw new UsageError(`${dir} is not a directory`);
  return numbered(dir, prefix).map((f) => tp.decode(fs.readFileSync(f), f));
}

function feedsFor(ort, session, inputs, dir) {
  if (inputs.length === 0) throw new UsageError(`${dir} has no input_<i>.pb files`);
  const feeds = {};
  inputs.forEach((t, i) => {
    const name = t.name || session.inputNames[i];
    if (!session.inputNames.includes(name)) {
      throw new UsageError(`${dir}: input_${i}.pb is named '${name}', but the model's inputs are: ${session.inputNames.join(', ')}`);
    }
    feeds[name] = new ort.Tensor(t.type, t.data, t.dims);
  });
  return feeds;
}

function asTypedArray(tensor) {
  const d = tensor.data;
  if (tensor.type === 'bool' && !(d instanceof Uint8Array)) return Uint8Array.from(d, (x) => (x ? 1 : 0));
  return d;
}

function writeOutputs(dir, session, results) {
  fs.mkdirSync(dir, { recursive: true });
  session.outputNames.forEach((name, i) => {
    const t = results[name];
    fs.writeFileSync(path.join(dir, `output_${i}.pb`), tp.encode(name, t.type, Array.from(t.dims), asTypedArray(t)));
  });
}

// ------------------------------------------------------------------------------ compare
function halfToFloat(h) {
  const s = h & 0x8000 ? -1 : 1;
  const e = (h >> 10) & 0x1f;
  const f = h & 0x3ff;
  if (e === 0) return s * f * 2 ** -24;
  if (e === 31) return f ? NaN : s * Infinity;
  return s * (1 + f / 1024) * 2 ** (e - 15);
}

function valueAt(tensor, i) {
  const v = tensor.data[i];
  if (tensor.type === 'float16') return halfToFloat(v);
  return v;
}

function relativeFloor(atol, rtol, dtype) {
  const smallest = EXACT.has(dtype) ? 1 : TINY[dtype] || TINY.float32;
  const floor = rtol > 0 ? atol / rtol : atol;
  return Math.max(floor, smallest);
}

function percentile(sorted, q) {
  // numpy.percentile's default ("linear") interpolation.
  const n = sorted.length;
  if (n === 0) return 0;
  const idx = (q / 100) * (n - 1);
  const lo = Math.floor(idx);
  const hi = Math.min(lo + 1, n - 1);
  return sorted[lo] + (sorted[hi] - sorted[lo]) * (idx - lo);
}

function fmt(x) {
  if (x === null || x === undefined) return '-';
  return Number(x.toPrecision(3)).toString();
}

function line(check) {
  const label = check.case ? `${check.output} @ ${check.case}` : check.output;
  const parts = [];
  if (check.reason) parts.push(check.reason);
  if (check.max_abs !== null) {
    parts.push(
      `max_abs ${fmt(check.max_abs)}, max_rel ${fmt(check.max_rel)}, mean_abs ${fmt(check.mean_abs)}, ` +
        `p99_abs ${fmt(check.p99_abs)}, ${check.n_bad}/${check.n_total} elements out of tolerance, ` +
        `${check.nan_mismatch} NaN/Inf mismatches`,
    );
  }
  parts.push(`tolerance atol=${check.atol} rtol=${check.rtol} (${check.dtype})`);
  return `${label}: ${parts.join('; ')}`;
}

function failedCheck(output, kase, dims, shape, dtype, atol, rtol, reason) {
  const n = shape ? shape.reduce((a, b) => a * b, 1) : 0;
  return {
    output, case: kase, dims, shape, dtype, atol, rtol, rel_floor: relativeFloor(atol, rtol, dtype),
    max_abs: null, max_rel: null, mean_abs: null, p99_abs: null,
    n_bad: n, n_total: n, nan_mismatch: 0, ok: false, reason,
  };
}

/** Compare one output; the same rules as exporter.parity.compare. */
function compareOne(name, ref, cand, tol, kase, dims) {
  const dtype = ref.type;
  const exact = EXACT.has(dtype);
  const atol = exact ? 0 : tol.atol;
  const rtol = exact ? 0 : tol.rtol;
  const shape = Array.from(ref.dims);
  if (!cand) return failedCheck(name, kase, dims, shape, dtype, atol, rtol, 'missing from the candidate');
  const cshape = Array.from(cand.dims);
  if (cshape.length !== shape.length || cshape.some((d, i) => d !== shape[i])) {
    return failedCheck(name, kase, dims, shape, dtype, atol, rtol, `shape (${cshape.join(', ')}), expected (${shape.join(', ')})`);
  }
  let reason = '';
  if (cand.type !== dtype && !(EXACT.has(cand.type) && exact && cand.type !== 'bool' && dtype !== 'bool')) {
    reason = `dtype ${cand.type}, expected ${dtype}`;
  }
  const floor = relativeFloor(atol, rtol, dtype);
  const n = shape.reduce((a, b) => a * b, 1);
  const errs = new Float64Array(n);
  let m = 0;
  let nBad = 0;
  let nanMismatch = 0;
  let maxAbs = 0;
  let maxRel = 0;
  let sum = 0;
  for (let i = 0; i < n; i++) {
    const rv = valueAt(ref, i);
    const cv = valueAt(cand, i);
    if (exact) {
      const same = typeof rv === 'bigint' || typeof cv === 'bigint' ? BigInt(rv) === BigInt(cv) : Number(rv) === Number(cv);
      const err = Math.abs(Number(rv) - Number(cv));
      if (!same) nBad++;
      errs[m++] = err;
      sum += err;
      if (err > maxAbs) maxAbs = err;
      const rel = err / Math.max(Math.abs(Number(rv)), floor);
      if (rel > maxRel) maxRel = rel;
      continue;
    }
    const r = Number(rv);
    const c = Number(cv);
    const fr = Number.isFinite(r);
    const fc = Number.isFinite(c);
    if (fr && fc) {
      const err = Math.abs(c - r);
      const mag = Math.abs(r);
      if (!(err <= atol + rtol * mag)) nBad++;
      errs[m++] = err;
      sum += err;
      if (err > maxAbs) maxAbs = err;
      const rel = err / Math.max(mag, floor);
      if (rel > maxRel) maxRel = rel;
    } else {
      const same = !fr && !fc && ((Number.isNaN(r) && Number.isNaN(c)) || r === c);
      if (!same) {
        nanMismatch++;
        nBad++;
      }
    }
  }
  const finite = errs.subarray(0, m).sort();
  const check = {
    output: name, case: kase, dims, shape, dtype, atol, rtol, rel_floor: floor,
    max_abs: maxAbs, max_rel: maxRel, mean_abs: m ? sum / m : 0, p99_abs: percentile(finite, 99),
    n_bad: nBad, n_total: n, nan_mismatch: nanMismatch, ok: false, reason,
  };
  check.ok = !reason && nBad === 0 && nanMismatch === 0;
  return check;
}

// ------------------------------------------------------------------------------- verify
function sha256(file) {
  return crypto.createHash('sha256').update(fs.readFileSync(file)).digest('hex');
}

function integrityCheck(label, reason) {
  return {
    output: label, case: 'integrity', dims: {}, shape: null, dtype: 'bytes', atol: 0, rtol: 0, rel_floor: 0,
    max_abs: null, max_rel: null, mean_abs: null, p99_abs: null, n_bad: 0, n_total: 0, nan_mismatch: 0,
    ok: false, reason,
  };
}

function readManifest(bundle) {
  const file = path.join(bundle, 'manifest.json');
  if (!fs.existsSync(file)) return null;
  try {
    return JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch (e) {
    throw new UsageError(`${file} cannot be read as JSON (${e.message}); re-export the bundle`);
  }
}

function toleranceFor(manifest, opts) {
  const tols = (manifest && manifest.tolerances) || {};
  const perOutput = tols.per_output || {};
  const defaults = tols.defaults || {};
  return (output, dtype) => {
    const base = perOutput[output] || defaults[dtype];
    if (!base) {
      if (opts.atol !== null && opts.rtol !== null) return { atol: opts.atol, rtol: opts.rtol };
      const where = manifest ? 'manifest.json records no tolerance' : 'there is no manifest.json with tolerances';
      throw new UsageError(`${where} for output '${output}' (${dtype}); pass --atol and --rtol`);
    }
    return {
      atol: opts.atol === null ? Number(base.atol) : opts.atol,
      rtol: opts.rtol === null ? Number(base.rtol) : opts.rtol,
    };
  };
}

async function verify(ort, bundle, opts) {
  if (!fs.existsSync(bundle) || !fs.statSync(bundle).isDirectory()) {
    throw new UsageError(`bundle ${bundle} is not a directory; pass OUT/<model>/<framework> written by \`exporter export\``);
  }
  const manifest = readManifest(bundle);
  const onnxInfo = (manifest && manifest.onnx) || {};
  const modelPath = path.join(bundle, onnxInfo.file || 'model.onnx');
  let sets = manifest && Array.isArray(manifest.test_data_sets) && manifest.test_data_sets.length ? manifest.test_data_sets : null;
  if (!sets) {
    sets = fs
      .readdirSync(bundle)
      .filter((d) => /^test_data_set_\d+$/.test(d))
      .sort((a, b) => Number(a.split('_').pop()) - Number(b.split('_').pop()))
      .map((d) => ({ dir: d, case: d, dims: {} }));
  }
  const problems = [];
  if (!fs.existsSync(modelPath)) problems.push(`${path.basename(modelPath)} is missing`);
  for (const s of sets) if (!fs.existsSync(path.join(bundle, s.dir))) problems.push(`test data set ${s.dir} is missing`);
  if (!sets.length) problems.push('no test data sets');
  if (problems.length) throw new UsageError(`bundle ${bundle} is incomplete; re-export it:\n  - ${problems.sort().join('\n  - ')}`);

  const checks = [];
  if (opts.hashes && manifest) {
    const files = [[modelPath, onnxInfo.sha256]];
    if (onnxInfo.external_data) files.push([path.join(bundle, onnxInfo.external_data.file), onnxInfo.external_data.sha256]);
    for (const [f, want] of files) {
      if (!fs.existsSync(f)) checks.push(integrityCheck(path.basename(f), 'missing file listed in the manifest'));
      else if (want) {
        const got = sha256(f);
        if (got !== want) {
          checks.push(integrityCheck(path.basename(f), `sha256 ${got.slice(0, 16)}... differs from the manifest's ${String(want).slice(0, 16)}...: the file changed after export`));
        }
      }
    }
  }
  const tol = toleranceFor(manifest, opts);
  const session = await createSession(ort, modelPath, opts.threads);
  for (const s of sets) {
    const dir = path.join(bundle, s.dir);
    const kase = String(s.case || s.dir);
    const dims = s.dims || {};
    const inputs = readTensors(dir, 'input');
    const expected = readTensors(dir, 'output');
    expected.forEach((t, i) => {
      if (!t.name) t.name = session.outputNames[i];
    });
    let results;
    try {
      results = await session.run(feedsFor(ort, session, inputs, dir));
    } catch (e) {
      if (e instanceof UsageError) throw e;
      const reason = `node failed to run: ${String(e.message).split('\n').join(' ')}`.slice(0, 600);
      for (const r of expected) {
        const t = EXACT.has(r.type) ? { atol: 0, rtol: 0 } : tol(r.name, r.type);
        checks.push(failedCheck(r.name, kase, dims, Array.from(r.dims), r.type, t.atol, t.rtol, reason));
      }
      continue;
    }
    if (opts.dump) writeOutputs(path.join(opts.dump, s.dir), session, results);
    for (const r of expected) {
      checks.push(compareOne(r.name, r, results[r.name], EXACT.has(r.type) ? { atol: 0, rtol: 0 } : tol(r.name, r.type), kase, dims));
    }
    const names = new Set(expected.map((r) => r.name));
    for (const name of [...session.outputNames].filter((n) => !names.has(n)).sort()) {
      checks.push(failedCheck(name, kase, dims, Array.from(results[name].dims), results[name].type, 0, 0, 'unexpected output: not produced by the reference'));
    }
  }
  const cases = [...new Set(checks.map((c) => c.case))];
  const order = new Map(cases.map((c, i) => [c, i]));
  const failed = checks.filter((c) => !c.ok).sort((a, b) => (a.output < b.output ? -1 : a.output > b.output ? 1 : order.get(a.case) - order.get(b.case)));
  const ok = checks.length > 0 && failed.length === 0;
  const framework = (manifest && manifest.framework) || path.basename(path.resolve(bundle));
  return {
    format: 'exporter-parity',
    format_version: 1,
    model: (manifest && manifest.model) || path.basename(path.dirname(path.resolve(bundle))),
    framework,
    reference: `${(manifest && manifest.framework) || 'framework'} (bundle test data)`,
    candidate: 'node',
    seed: manifest && manifest.seed !== undefined ? manifest.seed : null,
    ok,
    cases,
    checks,
    failures: ok ? [] : failed.map(line).concat(checks.length ? [] : ['no outputs were compared (no cases were run)']),
    runtime: versions(ort),
  };
}

function versions(ort) {
  return { node: process.version, 'onnxruntime-node': (ort.env && ort.env.versions && ort.env.versions.node) || null };
}

// ------------------------------------------------------------------------ run / serve
async function runOnce(ort, session, inputDir, outputDir) {
  const results = await session.run(feedsFor(ort, session, readTensors(inputDir, 'input'), inputDir));
  writeOutputs(outputDir, session, results);
  return [...session.outputNames];
}

async function serve(ort, modelPath, opts) {
  const session = await createSession(ort, modelPath, opts.threads);
  const say = (obj) => process.stdout.write(JSON.stringify(obj) + '\n');
  say({ ready: true, inputs: [...session.inputNames], outputs: [...session.outputNames], runtime: versions(ort) });
  const rl = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
  for await (const text of rl) {
    if (!text.trim()) continue;
    let req;
    try {
      req = JSON.parse(text);
    } catch (e) {
      say({ id: null, ok: false, error: `request is not JSON: ${e.message}` });
      continue;
    }
    try {
      const outputs = await runOnce(ort, session, req.inputs, req.outputs);
      say({ id: req.id, ok: true, outputs });
    } catch (e) {
      say({ id: req.id, ok: false, error: String(e.message) });
    }
  }
}

async function main(argv) {
  const [command, ...rest] = argv;
  const { positional, opts } = parseArgs(rest);
  const need = (n, usage) => {
    if (positional.length !== n) throw new UsageError(`usage: node run_bundle.js ${usage}`);
  };
  if (command === 'verify') {
    need(1, 'verify BUNDLE [--atol X] [--rtol Y] [--threads N] [--dump DIR] [--no-hashes]');
    const report = await verify(loadOrt(), positional[0], opts);
    process.stdout.write(JSON.stringify(report, null, 2) + '\n');
    return report.ok ? 0 : 1;
  }
  if (command === 'run') {
    need(3, 'run MODEL.onnx INPUT_DIR OUTPUT_DIR [--threads N]');
    const ort = loadOrt();
    const session = await createSession(ort, positional[0], opts.threads);
    const outputs = await runOnce(ort, session, positional[1], positional[2]);
    process.stdout.write(JSON.stringify({ ok: true, outputs }) + '\n');
    return 0;
  }
  if (command === 'serve') {
    need(1, 'serve MODEL.onnx [--threads N]');
    await serve(loadOrt(), positional[0], opts);
    return 0;
  }
  if (command === 'info') {
    need(1, 'info MODEL.onnx');
    const ort = loadOrt();
    const session = await createSession(ort, positional[0], opts.threads);
    process.stdout.write(JSON.stringify({ inputs: [...session.inputNames], outputs: [...session.outputNames], runtime: versions(ort) }) + '\n');
    return 0;
  }
  throw new UsageError('usage: node run_bundle.js verify|run|serve|info ...  (see the comment at the top of run_bundle.js)');
}

if (require.main === module) {
  main(process.argv.slice(2)).then(
    (code) => {
      process.exitCode = code;
    },
    (e) => {
      const known = e instanceof UsageError || e instanceof tp.TensorProtoError;
      process.stderr.write(`${known ? 'error' : 'internal error'}: ${known ? e.message : e.stack}\n`);
      if (process.argv[2] === 'verify') process.stdout.write(JSON.stringify({ ok: false, error: e.message }) + '\n');
      process.exitCode = 2;
    },
  );
}

module.exports = { verify, compareOne, main };
