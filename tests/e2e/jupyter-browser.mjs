// Drives Debian's Chromium (headless, via playwright-core; no browser download) through
// JupyterLab behind a jobgate relay: open the printed URL, run a cell, use a terminal,
// upload and download 50 MB, take a screenshot. Run by jupyter-browser.sh, which starts
// the relay and the agent.
//
// Environment:
//   JG_URL            the URL the agent printed (opened as is: it logs straight in)
//   JG_DOMAIN         the relay's domain; *.JG_DOMAIN resolves to 127.0.0.1
//   JG_SPKI           base64 SHA-256 of the relay certificate's public key: Chromium trusts
//                     that key (--ignore-certificate-errors-spki-list), nothing else
//   JG_SCREENSHOT     where to write the notebook screenshot (PNG)
//   JG_UPLOAD_MB      size of the upload round trip [50]
//   JG_NODE_PREFIX    directory whose node_modules holds playwright-core
//   JG_CHROMIUM       the browser [/usr/bin/chromium]
//   JG_HEADED=1       show the browser (needs a display)

import { env, launchBrowser, step, timings } from './browser.mjs';
import { randomBytes } from 'node:crypto';

const URL_ = env('JG_URL');
const DOMAIN = env('JG_DOMAIN');
const SPKI = env('JG_SPKI');
const SCREENSHOT = env('JG_SCREENSHOT');
const UPLOAD_MB = Number(env('JG_UPLOAD_MB', '50'));
const CHUNK = 1024 * 1024; // JupyterLab's own upload chunk size

const t0 = Date.now();

let browser;
let context;
let page;
let exitCode = 1;
try {
  browser = await step('launch chromium', () =>
    launchBrowser({ domain: DOMAIN, spki: SPKI, viewport: { width: 1400, height: 900 } }),
  );
  context = browser.context;
  page = context.pages()[0] ?? (await context.newPage());
  page.setDefaultTimeout(60_000);

  // WebSockets through the relay, by kind, with the frames they carried.
  const sockets = { kernel: 0, terminal: 0 };
  const frames = { kernel: 0, terminal: 0 };
  const framesSent = { kernel: 0, terminal: 0 };
  let rerun = false;
  page.on('websocket', (ws) => {
    const kind = /\/api\/kernels\/[^/]+\/channels/.test(ws.url())
      ? 'kernel'
      : /\/terminals\/websocket\//.test(ws.url())
        ? 'terminal'
        : null;
    if (!kind) return;
    sockets[kind] += 1;
    ws.on('framereceived', () => {
      frames[kind] += 1;
    });
    ws.on('framesent', () => {
      framesSent[kind] += 1;
    });
    ws.on('close', () => process.stderr.write(`[browser] ${kind} WebSocket closed\n`));
    ws.on('socketerror', (e) => process.stderr.write(`[browser] ${kind} WebSocket error: ${e}\n`));
  });
  const failures = [];
  page.on('response', (r) => {
    if (r.status() >= 500) failures.push(`${r.status()} ${r.url()}`);
  });

  await step('open the printed URL, Lab UI up', async () => {
    const response = await page.goto(URL_, { waitUntil: 'domcontentloaded' });
    if (!response || response.status() !== 200) {
      throw new Error(`the URL answered ${response && response.status()}`);
    }
    await page.locator('#jp-main-dock-panel').waitFor();
    await page.locator('.jp-Launcher').first().waitFor();
    const origin = new URL(page.url()).origin;
    if (!origin.endsWith(`.${DOMAIN}:${new URL(URL_).port}`) && !origin.endsWith(`.${DOMAIN}`)) {
      throw new Error(`landed on ${page.url()}`);
    }
  });

  // fetch() from inside the page: the browser's cookies, Jupyter's XSRF cookie as header.
  const api = (method, path, body) =>
    page.evaluate(
      async ({ method, path, body }) => {
        const xsrf = (document.cookie.match(/(?:^|;\s*)_xsrf=([^;]*)/) || [])[1];
        const headers = { 'Content-Type': 'application/json' };
        if (xsrf) headers['X-XSRFToken'] = decodeURIComponent(xsrf);
        const r = await fetch(path, {
          method,
          headers,
          body: body === undefined ? undefined : JSON.stringify(body),
          credentials: 'same-origin',
        });
        return { status: r.status, text: await r.text() };
      },
      { method, path, body },
    );

  await step('new Python notebook, kernel idle', async () => {
    await page.locator('.jp-LauncherCard[data-category="Notebook"]').first().click();
    await page.locator('.jp-NotebookPanel').first().waitFor();
    // A cell run before the kernel is connected is silently dropped: wait until the
    // kernel's WebSocket has carried messages and the status bar says Idle.
    const deadline = Date.now() + 120_000;
    while (frames.kernel === 0) {
      if (Date.now() > deadline) throw new Error('no traffic on the kernel WebSocket');
      await page.waitForTimeout(100);
    }
    await page
      .locator('.jp-StatusBar-TextItem')
      .filter({ hasText: /\|\s*Idle$/ })
      .first()
      .waitFor({ timeout: 120_000 });
  });

  await step('run print(6*7), see 42', async () => {
    const output = page
      .locator('.jp-NotebookPanel .jp-OutputArea-output')
      .filter({ hasText: /^\s*42\s*$/ })
      .first();
    const editor = page.locator('.jp-NotebookPanel .jp-Cell .cm-content').first();
    await editor.click();
    await page.keyboard.type('print(6*7)');
    await page.keyboard.press('Shift+Enter');
    try {
      await output.waitFor({ timeout: 20_000 });
    } catch {
      const sent = framesSent.kernel;
      process.stderr.write(
        `[browser] no 42 after 20 s (kernel frames sent ${sent}, received ${frames.kernel}); running the cell again\n`,
      );
      await editor.click();
      await page.keyboard.press('Shift+Enter');
      await output.waitFor({ timeout: 40_000 });
      rerun = true;
    }
    if (sockets.kernel === 0 || frames.kernel === 0) {
      throw new Error('no kernel WebSocket traffic seen');
    }
  });

  await step('screenshot', async () => {
    await page.screenshot({ path: SCREENSHOT });
  });

  const marker = `e2e-terminal-${randomBytes(6).toString('hex')}.txt`;
  await step('terminal: touch a file, see it in the Contents API', async () => {
    await page.locator('.lm-MenuBar-item', { hasText: /^File$/ }).click();
    await page.locator('.lm-Menu-item[data-type="submenu"]', { hasText: /^New/ }).first().hover();
    await page.locator('.lm-Menu-item[data-command="terminal:create-new"]').first().click();
    await page.locator('.jp-Terminal .xterm').first().waitFor();
    // The shell is there once the terminal WebSocket has carried its first output.
    const deadline = Date.now() + 60_000;
    while (frames.terminal === 0) {
      if (Date.now() > deadline) throw new Error('no output from the terminal WebSocket');
      await page.waitForTimeout(100);
    }
    await page.locator('.jp-Terminal .xterm').first().click();
    for (let attempt = 0; attempt < 3; attempt += 1) {
      await page.keyboard.type(`touch ${marker}`);
      await page.keyboard.press('Enter');
      for (let i = 0; i < 50; i += 1) {
        const r = await api('GET', `/api/contents/${marker}?content=0`);
        if (r.status === 200) return;
        await page.waitForTimeout(200);
      }
    }
    throw new Error(`${marker} never appeared`);
  });

  // The browser makes the data, hashes it, and uploads it the way JupyterLab's uploader
  // does: base64 chunks of 1 MiB PUT to the Contents API (chunk 1, 2, ..., last = -1).
  const uploadName = `e2e-upload-${randomBytes(4).toString('hex')}.bin`;
  const size = UPLOAD_MB * 1024 * 1024;
  const wantSha = await step(`upload ${UPLOAD_MB} MB (Contents API, chunked like JupyterLab)`, async () => {
    const result = await page.evaluate(
      async ({ name, size, chunkSize }) => {
        const data = new Uint8Array(size);
        for (let i = 0; i < size; i += 65536) crypto.getRandomValues(data.subarray(i, i + 65536));
        const digest = await crypto.subtle.digest('SHA-256', data);
        const sha = [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, '0')).join('');
        const base64 = (bytes) => {
          let binary = '';
          for (let i = 0; i < bytes.length; i += 32768) {
            binary += String.fromCharCode.apply(null, bytes.subarray(i, i + 32768));
          }
          return btoa(binary);
        };
        const xsrf = decodeURIComponent((document.cookie.match(/(?:^|;\s*)_xsrf=([^;]*)/) || [])[1] || '');
        for (let offset = 0; offset < size; offset += chunkSize) {
          const end = Math.min(offset + chunkSize, size);
          const chunk = end >= size ? -1 : end / chunkSize;
          const r = await fetch(`/api/contents/${name}`, {
            method: 'PUT',
            credentials: 'same-origin',
            headers: { 'Content-Type': 'application/json', 'X-XSRFToken': xsrf },
            body: JSON.stringify({
              type: 'file',
              format: 'base64',
              name,
              path: name,
              chunk,
              content: base64(data.subarray(offset, end)),
            }),
          });
          if (r.status !== 200 && r.status !== 201) {
            return { error: `chunk ${chunk}: ${r.status} ${(await r.text()).slice(0, 200)}` };
          }
        }
        return { sha };
      },
      { name: uploadName, size, chunkSize: CHUNK },
    );
    if (result.error) throw new Error(result.error);
    const r = await api('GET', `/api/contents/${uploadName}?content=0`);
    const got = JSON.parse(r.text).size;
    if (got !== size) throw new Error(`uploaded size ${got}, want ${size}`);
    return result.sha;
  });

  await step(`download ${UPLOAD_MB} MB through /files/, same SHA-256`, async () => {
    const got = await page.evaluate(async (name) => {
      const r = await fetch(`/files/${name}`, { credentials: 'same-origin' });
      const buf = await r.arrayBuffer();
      const digest = await crypto.subtle.digest('SHA-256', buf);
      const hex = [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, '0')).join('');
      return { status: r.status, length: buf.byteLength, sha: hex };
    }, uploadName);
    if (got.status !== 200 || got.length !== size || got.sha !== wantSha) {
      throw new Error(`download: ${JSON.stringify(got)}, want ${size} bytes, sha ${wantSha}`);
    }
  });

  await step('clean up the test files', async () => {
    for (const name of [uploadName, marker]) {
      const r = await api('DELETE', `/api/contents/${name}`);
      if (r.status !== 204) throw new Error(`DELETE ${name}: ${r.status}`);
    }
  });

  if (failures.length) throw new Error(`server errors seen: ${failures.join(', ')}`);
  process.stderr.write(
    `[browser] websockets: kernel ${sockets.kernel} (${frames.kernel} frames), terminal ${sockets.terminal} (${frames.terminal} frames)\n`,
  );
  process.stdout.write(
    `${JSON.stringify({ result: 'PASS', seconds: (Date.now() - t0) / 1000, cell_rerun: rerun, timings })}\n`,
  );
  exitCode = 0;
} catch (e) {
  process.stderr.write(`[browser] FAIL: ${e && e.stack ? e.stack : e}\n`);
  if (page) {
    const failShot = SCREENSHOT.replace(/\.png$/, '') + '-failure.png';
    await page.screenshot({ path: failShot }).catch(() => {});
    process.stderr.write(`[browser] failure screenshot: ${failShot}\n`);
  }
} finally {
  if (browser) await browser.close();
}
process.exit(exitCode);
