#!/usr/bin/env node
'use strict';
/**
 * The Node half of exporter's browser runtime: drives headless Chromium (the system's,
 * never a downloaded one) with playwright-core.
 *
 * Usage:
 *   node browser/driver.js serve --base URL --model PATH --chromium EXE
 *                                [--threads N] [--external-data FILE]...
 *       Open BASE + "page/index.html" (served by exporter's local server), load the model
 *       (a URL path under BASE) in onnxruntime-web, print one JSON line
 *       {"ready": true, "inputs": [...], "outputs": [...], "versions": {...}, ...}, then
 *       answer JSON lines on stdin {"id": 1, "inputs": [URL, ...]} with
 *       {"id": 1, "ok": true, "outputs": [{"name", "b64"}]} (base64 TensorProto) or
 *       {"id": 1, "ok": false, "error": "..."}.  Ends at EOF on stdin.
 *   node browser/driver.js snapshot --url URL --chromium EXE --screenshot PNG
 *                                   [--width W] [--height H] [--viewport-only] [--selector CSS]...
 *       Open URL (e.g. a file:// report), take a screenshot (full page unless --viewport-only), and print
 *       {"ok": true, "console_errors": [...], "blocked": [...], "counts": {CSS: n},
 *        "svg": [{"id", "children", "width", "height"}], "text": "..."}.
 *
 * Every request to another origin than BASE (serve) or to the network at all (snapshot:
 * only file: and data: URLs load) is aborted and listed, so a page that would need the
 * network shows it.  Console errors and uncaught page errors are collected and reported.
 * Exit codes: 0 ok, 2 bad usage or the page/model failed to load (JSON with "error").
 */

const fs = require('fs');
const readline = require('readline');

const LAUNCH_ARGS = [
  '--no-sandbox',
  '--disable-gpu',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--no-first-run',
  '--disable-default-apps',
  '--disable-extensions',
];

class UsageError extends Error {}

function parseArgs(argv) {
  const opts = { externalData: [], selector: [], threads: 1, width: 1280, height: 900 };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const value = () => {
      if (i + 1 >= argv.length) throw new UsageError(`${a} needs a value`);
      return argv[++i];
    };
    const int = () => {
      const v = Number(value());
      if (!Number.isInteger(v) || v < 1) throw new UsageError(`${a} must be a positive integer`);
      return v;
    };
    if (a === '--base') opts.base = value();
    else if (a === '--model') opts.model = value();
    else if (a === '--url') opts.url = value();
    else if (a === '--chromium') opts.chromium = value();
    else if (a === '--screenshot') opts.screenshot = value();
    else if (a === '--external-data') opts.externalData.push(value());
    else if (a === '--selector') opts.selector.push(value());
    else if (a === '--viewport-only') opts.viewportOnly = true;
    else if (a === '--threads') opts.threads = int();
    else if (a === '--width') opts.width = int();
    else if (a === '--height') opts.height = int();
    else throw new UsageError(`unknown argument ${a}`);
  }
  return opts;
}

function need(opts, keys, usage) {
  const missing = keys.filter((k) => !opts[k]);
  if (missing.length) throw new UsageError(`missing --${missing.join(', --')}; usage: node browser/driver.js ${usage}`);
}

function playwright() {
  try {
    return require('playwright-core');
  } catch (e) {
    throw new UsageError(`playwright-core is not installed (${e.message.split('\n')[0]}); install it with: cd runtimes/js && npm ci --ignore-scripts`);
  }
}

/** Chromium in a fresh profile (playwright makes a new --user-data-dir per launch and
 * removes it on close), with network watch and error capture. */
async function open(opts, allowed) {
  const browser = await playwright().chromium.launch({ executablePath: opts.chromium, headless: true, args: LAUNCH_ARGS });
  const context = await browser.newContext({ viewport: { width: opts.width, height: opts.height } });
  const page = await context.newPage();
  const log = { consoleErrors: [], blocked: [] };
  await context.route('**/*', (route) => {
    const url = route.request().url();
    if (allowed(url)) return route.continue();
    log.blocked.push(url);
    return route.abort('blockedbyclient');
  });
  page.on('console', (msg) => {
    if (msg.type() === 'error') log.consoleErrors.push(msg.text());
  });
  page.on('pageerror', (err) => log.consoleErrors.push(`uncaught: ${err.message}`));
  return { browser, context, page, log };
}

function say(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

/** What the page logged or tried to fetch since the last reply. */
function drain(log) {
  return { console_errors: log.consoleErrors.splice(0), blocked: log.blocked.splice(0) };
}

async function serve(opts) {
  need(opts, ['base', 'model', 'chromium'], 'serve --base URL --model PATH --chromium EXE');
  const base = new URL(opts.base);
  const { browser, page, log } = await open(opts, (url) => url.startsWith(base.origin + '/'));
  let hello;
  try {
    await page.goto(new URL('page/index.html', base).href, { waitUntil: 'load' });
    hello = await page.evaluate(
      (o) => window.exporterRunner.load(o),
      { model: opts.model, externalData: opts.externalData, threads: opts.threads, wasmPaths: new URL('ort/', base).href },
    );
  } catch (e) {
    const seen = drain(log);
    say({ ready: false, error: String(e.message).split('\n')[0], ...seen });
    await browser.close();
    return 2;
  }
  say({
    ready: true,
    inputs: hello.inputs,
    outputs: hello.outputs,
    versions: {
      chromium: browser.version(),
      'onnxruntime-web': hello.onnxruntimeWeb,
      'playwright-core': require('playwright-core/package.json').version,
      node: process.version,
    },
    wasm: { threads: hello.threads, simd: hello.simd, cross_origin_isolated: hello.crossOriginIsolated },
    ...drain(log),
  });
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
      const outputs = await page.evaluate((urls) => window.exporterRunner.run(urls), req.inputs);
      say({ id: req.id, ok: true, outputs, ...drain(log) });
    } catch (e) {
      say({ id: req.id, ok: false, error: String(e.message).split('\n').slice(0, 3).join(' '), ...drain(log) });
    }
  }
  await browser.close();
  return 0;
}

async function snapshot(opts) {
  need(opts, ['url', 'chromium', 'screenshot'], 'snapshot --url URL --chromium EXE --screenshot PNG');
  const { browser, page, log } = await open(opts, (url) => url.startsWith('file:') || url.startsWith('data:'));
  try {
    await page.goto(opts.url, { waitUntil: 'load' });
    await page.waitForTimeout(100); // let inline scripts that run on load finish drawing
    await page.screenshot({ path: opts.screenshot, fullPage: !opts.viewportOnly });
    const selectors = opts.selector.length ? opts.selector : ['svg'];
    const found = await page.evaluate((sels) => {
      const counts = {};
      for (const s of sels) counts[s] = document.querySelectorAll(s).length;
      const svg = [...document.querySelectorAll('svg')].map((el) => {
        const box = el.getBoundingClientRect();
        return { id: el.id || null, children: el.querySelectorAll('*').length, width: box.width, height: box.height };
      });
      return { counts, svg, text: document.body ? document.body.innerText : '' };
    }, selectors);
    say({ ok: true, ...found, ...drain(log) });
  } finally {
    await browser.close();
  }
  return 0;
}

async function main(argv) {
  const [command, ...rest] = argv;
  const opts = parseArgs(rest);
  if (opts.chromium && !fs.existsSync(opts.chromium)) throw new UsageError(`Chromium ${opts.chromium} does not exist`);
  if (command === 'serve') return serve(opts);
  if (command === 'snapshot') return snapshot(opts);
  throw new UsageError('usage: node browser/driver.js serve|snapshot ...  (see the comment at the top of driver.js)');
}

if (require.main === module) {
  main(process.argv.slice(2)).then(
    (code) => {
      process.exitCode = code;
    },
    (e) => {
      const known = e instanceof UsageError;
      process.stderr.write(`${known ? 'error' : 'internal error'}: ${known ? e.message : e.stack}\n`);
      say({ ready: false, ok: false, error: String(e.message).split('\n')[0] });
      process.exitCode = 2;
    },
  );
}
