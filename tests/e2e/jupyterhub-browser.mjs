// Drives Debian's Chromium (headless, via playwright-core) through JupyterHub whose
// single-user server runs in a Slurm job behind a jobgate relay (JobgateSlurmSpawner): log
// in, spawn, open a notebook, run print(6*7) -> 42, stop the server from the hub's home
// page. Run by jupyterhub.sh, which starts the relay, the hub and its proxy.
//
// Environment:
//   JG_HUB_URL        the hub's public URL (http://127.0.0.1:PORT)
//   JG_USER, JG_PASSWORD  the hub login
//   JG_SCREENSHOT     where to write the notebook screenshot (PNG)
//   JG_NODE_PREFIX    directory whose node_modules holds playwright-core
//   JG_CHROMIUM       the browser [/usr/bin/chromium]

import { env, launchBrowser, step } from './browser.mjs';

const HUB = env('JG_HUB_URL').replace(/\/$/, '');
const USER = env('JG_USER');
const PASSWORD = env('JG_PASSWORD');
const SCREENSHOT = env('JG_SCREENSHOT');


let browser;
let context;
let page;
let exitCode = 1;
try {
  browser = await step('launch chromium', () =>
    launchBrowser({ viewport: { width: 1400, height: 900 } }),
  );
  context = browser.context;
  page = context.pages()[0] ?? (await context.newPage());
  page.setDefaultTimeout(120_000);

  let kernelFrames = 0;
  let kernelSockets = 0;
  page.on('websocket', (ws) => {
    if (!/\/api\/kernels\/[^/]+\/channels/.test(ws.url())) return;
    kernelSockets += 1;
    // The browser talks to the hub's origin only; the proxy carries the socket on to
    // the relay.
    if (!ws.url().startsWith(HUB.replace(/^http/, 'ws'))) {
      process.stderr.write(`[browser] kernel WebSocket not on the hub: ${ws.url()}\n`);
    }
    ws.on('framereceived', () => {
      kernelFrames += 1;
    });
  });

  await step('log in to the hub', async () => {
    await page.goto(`${HUB}/hub/login`);
    await page.locator('#username_input').fill(USER);
    await page.locator('#password_input').fill(PASSWORD);
    await page.locator('#login_submit').click();
  });

  await step('spawn: JupyterLab up at /user/<name>/ on the hub', async () => {
    // Fail at once when the hub says the spawn failed (its progress page shows it).
    const failed = page.getByText(/Spawn failed/).first().waitFor({ timeout: 150_000 }).then(() => {
      throw new Error('the hub says: spawn failed');
    });
    failed.catch(() => {});
    await Promise.race([
      page.waitForURL(new RegExp(`^${HUB}/user/${USER}/lab`), { timeout: 150_000 }),
      failed,
    ]);
    // A clean Lab workspace (the user's home keeps the last one between runs).
    await page.goto(`${HUB}/user/${USER}/lab?reset`);
    await page.locator('#jp-main-dock-panel').waitFor();
    await page.locator('.jp-Launcher').first().waitFor();
  });

  await step('new Python notebook, kernel idle', async () => {
    await page.locator('.jp-LauncherCard[data-category="Notebook"]').first().click();
    await page.locator('.jp-NotebookPanel').first().waitFor();
    const deadline = Date.now() + 120_000;
    while (kernelFrames === 0) {
      if (Date.now() > deadline) throw new Error('no traffic on the kernel WebSocket');
      await page.waitForTimeout(100);
    }
    await page
      .locator('.jp-StatusBar-TextItem')
      .filter({ hasText: /\|\s*Idle$/ })
      .first()
      .waitFor();
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
      process.stderr.write('[browser] no 42 after 20 s; running the cell again\n');
      await editor.click();
      await page.keyboard.press('Shift+Enter');
      await output.waitFor({ timeout: 40_000 });
    }
    if (kernelSockets === 0) throw new Error('no kernel WebSocket seen');
  });

  await step('screenshot', async () => {
    await page.screenshot({ path: SCREENSHOT });
  });

  await step('stop the server from the hub home page', async () => {
    await page.goto(`${HUB}/hub/home`);
    // The hub's script binds the button after the page loads: a click before that does
    // nothing (seen in CI: no stop request ever reached the hub). Click until the stop
    // request goes out.
    const isStop = (request) =>
      request.method() === 'DELETE' && /\/hub\/api\/users\/[^/]+\/server(\?|$)/.test(request.url());
    for (let attempt = 1; ; attempt++) {
      const sent = page.waitForRequest(isStop, { timeout: 5_000 }).then(
        () => true,
        () => false,
      );
      await page.locator('#stop').click();
      if (await sent) break;
      if (attempt === 5) throw new Error('clicking "Stop My Server" sent no stop request');
      process.stderr.write(`[browser] no stop request after click ${attempt}; clicking again\n`);
    }
    // The hub's page hides the stop button once the spawner's stop() returned.
    await page.locator('#stop').waitFor({ state: 'hidden', timeout: 120_000 });
  });
  exitCode = 0;
} catch (e) {
  process.stderr.write(`[browser] ${e.stack || e}\n`);
  if (page) {
    process.stderr.write(`[browser] page: ${page.url()}\n`);
    await page.screenshot({ path: SCREENSHOT.replace(/\.png$/, '-failure.png') }).catch(() => {});
  }
} finally {
  if (browser) await browser.close();
}
process.exit(exitCode);
