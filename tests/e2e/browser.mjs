// Shared by the browser tests in this directory: reading the environment, timed steps,
// and Debian's Chromium (headless, via playwright-core; no browser download) set up for a
// jobgate relay on loopback: *.DOMAIN resolves to 127.0.0.1 and only the relay
// certificate's key is trusted.
//
// Environment read here:
//   JG_NODE_PREFIX    directory whose node_modules holds playwright-core
//   JG_CHROMIUM       the browser [/usr/bin/chromium]
//   JG_HEADED=1       show the browser (needs a display)

import { createRequire } from 'node:module';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const require = createRequire(join(process.env.JG_NODE_PREFIX || process.cwd(), 'noop.js'));
const { chromium } = require('playwright-core');

/** The variable's value, `fallback` when unset; neither: an error naming it. */
export const env = (name, fallback) => {
  const value = process.env[name] ?? fallback;
  if (value === undefined) throw new Error(`${name} is not set`);
  return value;
};

/** Seconds each step took, by name, for the caller's report. */
export const timings = {};

/** Runs `fn` as a named step: progress and its seconds on stderr, failures named. */
export const step = async (name, fn) => {
  const start = Date.now();
  process.stderr.write(`[browser] ${name} ...\n`);
  try {
    const result = await fn();
    timings[name] = (Date.now() - start) / 1000;
    process.stderr.write(`[browser] ${name}: ok in ${timings[name].toFixed(1)} s\n`);
    return result;
  } catch (e) {
    process.stderr.write(`[browser] ${name}: FAILED after ${((Date.now() - start) / 1000).toFixed(1)} s\n`);
    throw e;
  }
};

/**
 * Chromium's flags for a relay on loopback: `*.domain` resolves to 127.0.0.1 and only the
 * key whose base64 SHA-256 is `spki` is trusted (both left out when not given). The other
 * flags keep Chromium off this machine's closed network (background networking, component
 * updates and sync would each try to reach Google).
 */
const chromiumOptions = ({ domain, spki } = {}) => ({
  executablePath: env('JG_CHROMIUM', '/usr/bin/chromium'),
  headless: process.env.JG_HEADED !== '1',
  args: [
    '--no-sandbox',
    '--disable-gpu',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
    ...(domain ? [`--host-resolver-rules=MAP *.${domain} 127.0.0.1`] : []),
    ...(spki ? [`--ignore-certificate-errors-spki-list=${spki}`] : []),
  ],
});

/** Chromium without a profile, for tests that need several separate browser contexts. */
export const launchChromium = (target) => chromium.launch(chromiumOptions(target));

/**
 * Chromium with a fresh profile for `domain` and `spki` (see `chromiumOptions`). Returns
 * { context, close }; `close` also removes the profile.
 */
export const launchBrowser = async ({ domain, spki, viewport } = {}) => {
  const profile = mkdtempSync(join(tmpdir(), 'jobgate-chromium-'));
  const close = async (context) => {
    if (context) await context.close().catch(() => {});
    rmSync(profile, { recursive: true, force: true });
  };
  try {
    const context = await chromium.launchPersistentContext(profile, {
      ...chromiumOptions({ domain, spki }),
      ...(viewport ? { viewport } : {}),
    });
    return { context, close: () => close(context) };
  } catch (e) {
    await close(undefined);
    throw e;
  }
};
