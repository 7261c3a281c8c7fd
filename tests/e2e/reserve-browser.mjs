// Drives Debian's Chromium (headless, via playwright-core) to a reserved URL whose job
// cannot start yet (run by slurm-reserve.sh: held with scontrol hold): the page must say the job
// is queued, and why; then, once the shell has let the job start, the same tab must show
// the app (the job's directory listing) without the test reloading or navigating.
//
// Environment:
//   JG_URL            the URL `jobgate launch --no-wait` printed (with its jobgate_key)
//   JG_REASON         the reason Slurm gives (JobHeldAdmin)
//   JG_MARKER         a file name the app's listing shows once it is up
//   JG_SIGNAL         a file this script creates once the queued page was checked
//   JG_DOMAIN         the relay's domain; *.JG_DOMAIN resolves to 127.0.0.1
//   JG_SPKI           base64 SHA-256 of the relay certificate's public key (trusted alone)
//   JG_NODE_PREFIX    directory whose node_modules holds playwright-core

import { writeFileSync } from 'node:fs';
import { env, launchBrowser, step, timings } from './browser.mjs';

const URL = env('JG_URL');
const REASON = env('JG_REASON');
const MARKER = env('JG_MARKER');
const SIGNAL = env('JG_SIGNAL');
const APP_WITHIN_MS = 180000;

const { context, close } = await launchBrowser({ domain: env('JG_DOMAIN'), spki: env('JG_SPKI') });
let failed = false;
try {
  const page = context.pages()[0] ?? (await context.newPage());
  let navigations = 0;
  page.on('framenavigated', (frame) => {
    if (frame === page.mainFrame()) navigations += 1;
  });
  await step('the reserved URL says the job is queued, and why', async () => {
    await page.goto(URL, { waitUntil: 'domcontentloaded' });
    await page.waitForFunction(
      (reason) => document.getElementById('state')?.dataset.state === 'queued'
        && document.body.innerText.includes(reason),
      REASON,
      { timeout: 30000 },
    );
  });
  const before = navigations;
  writeFileSync(SIGNAL, 'queued page checked\n');
  await step('the same tab turns into the app once the job runs', async () => {
    await page.waitForFunction(
      (marker) => document.body && document.body.innerText.includes(marker),
      MARKER,
      { timeout: APP_WITHIN_MS, polling: 500 },
    );
  });
  // The page reloaded itself (that is its design): the test did not navigate.
  process.stderr.write(`[browser] the page navigated itself ${navigations - before} time(s)\n`);
  process.stderr.write(`[browser] timings ${JSON.stringify(timings)}\n`);
} catch (e) {
  failed = true;
  process.stderr.write(`[browser] ${e.stack || e}\n`);
} finally {
  await close();
}
process.exit(failed ? 1 : 0);
