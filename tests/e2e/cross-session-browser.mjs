// Drives Debian's Chromium (headless, via playwright-core) through two jobgate sessions
// under one domain: the victim's (opened with its printed link, so the browser holds its
// cookie) and the attacker's, whose page tries to act in the victim's session with that
// cookie: a POST, a credentialed CORS GET and a WebSocket. Run by cross-session-browser.sh,
// which starts the relay and both agents (each running cross-session-app.py).
//
// Checks, in the browser: the attack's WebSocket never opens; the victim's app never saw a
// request of the attack (its /log, read by the victim's own page); the victim's own page
// still works (same-origin POST and WebSocket echo), before and after the attack; a plain
// link on the attacker's page still opens the victim's session (top-level navigation).
//
// Environment:
//   JG_VICTIM_URL     the URL the victim's agent printed (with its jobgate_key)
//   JG_ATTACKER_URL   the URL the attacker's agent printed (with its jobgate_key)
//   JG_DOMAIN         the relay's domain; *.JG_DOMAIN resolves to 127.0.0.1
//   JG_SPKI           base64 SHA-256 of the relay certificate's public key (trusted alone)
//   JG_NODE_PREFIX    directory whose node_modules holds playwright-core
//   JG_CHROMIUM       the browser [/usr/bin/chromium]

import { env, launchBrowser, step } from './browser.mjs';

const VICTIM_URL = env('JG_VICTIM_URL');
const ATTACKER_URL = env('JG_ATTACKER_URL');
const DOMAIN = env('JG_DOMAIN');
const SPKI = env('JG_SPKI');


// In the victim's page: a same-origin POST and a WebSocket echo through the relay.
const ownPageWorks = async (page, label) => {
  const result = await page.evaluate(async () => {
    const post = await fetch('/echo?from=own', { method: 'POST', body: 'mine' });
    const postText = await post.text();
    const echoed = await new Promise((resolve) => {
      const ws = new WebSocket(`wss://${location.host}/ws?from=own`);
      const timer = setTimeout(() => resolve('timeout'), 20000);
      ws.onopen = () => ws.send('hello');
      ws.onmessage = (m) => {
        clearTimeout(timer);
        resolve(String(m.data));
        ws.close();
      };
      ws.onerror = () => {
        clearTimeout(timer);
        resolve('error');
      };
    });
    return { status: post.status, postText, echoed };
  });
  if (result.status !== 200 || !result.postText.startsWith(`${label} got POST: mine`)) {
    throw new Error(`the victim's own POST failed: ${JSON.stringify(result)}`);
  }
  if (result.echoed !== 'hello') {
    throw new Error(`the victim's own WebSocket echo failed: ${JSON.stringify(result)}`);
  }
};

let browser;
let context;
let exitCode = 1;
try {
  browser = await step('launch chromium', () =>
    launchBrowser({ domain: DOMAIN, spki: SPKI }),
  );
  context = browser.context;
  const victim = context.pages()[0] ?? (await context.newPage());
  victim.setDefaultTimeout(60_000);
  const victimOrigin = new URL(VICTIM_URL).origin;

  await step("open the victim's link: logged in, own page works", async () => {
    const response = await victim.goto(VICTIM_URL, { waitUntil: 'domcontentloaded' });
    if (!response || response.status() !== 200) {
      throw new Error(`the victim's URL answered ${response && response.status()}`);
    }
    if (new URL(victim.url()).searchParams.has('jobgate_key')) {
      throw new Error(`the key stayed in the address bar: ${victim.url()}`);
    }
    const cookies = await context.cookies(victimOrigin);
    if (!cookies.some((c) => c.name.startsWith('__Host-jobgate-'))) {
      throw new Error('the browser holds no jobgate cookie for the victim');
    }
    await ownPageWorks(victim, 'victim');
  });

  const result = await step("the attacker's page acts in the victim's session", async () => {
    const attacker = await context.newPage();
    attacker.setDefaultTimeout(60_000);
    const url = new URL(ATTACKER_URL);
    url.pathname = '/attack.html';
    url.searchParams.set('victim', victimOrigin);
    const response = await attacker.goto(url.toString(), { waitUntil: 'domcontentloaded' });
    if (!response || response.status() !== 200) {
      throw new Error(`the attacker's page answered ${response && response.status()}`);
    }
    if (new URL(attacker.url()).origin === victimOrigin) throw new Error('one origin for both sessions');
    await attacker.locator('#result:not(:empty)').waitFor();
    const text = await attacker.locator('#result').textContent();
    process.stderr.write(`[browser] attack result: ${text}\n`);
    // A plain link from the other session's page still opens the victim's session (a
    // top-level GET navigation: what SameSite=Lax allows, e.g. a link in a mail).
    const [opened] = await Promise.all([
      attacker.waitForNavigation({ waitUntil: 'domcontentloaded' }),
      attacker.locator('#link').click(),
    ]);
    if (!opened || opened.status() !== 200 || (await attacker.locator('#label').textContent()) !== 'victim') {
      throw new Error(`a link to the victim's session answered ${opened && opened.status()}`);
    }
    await attacker.close();
    return JSON.parse(text);
  });

  await step("the victim's session did not act on it", async () => {
    if (result.ws !== 'refused') {
      throw new Error(`the attacker's WebSocket into the victim's session: ${result.ws}`);
    }
    if (result.cors !== 'error') throw new Error(`the attacker read the victim's answer: ${result.cors}`);
    const seen = await victim.evaluate(async () => (await fetch('/log')).json());
    const attacks = seen.filter((line) => line.includes('from=attack'));
    if (attacks.length) {
      throw new Error(`the victim's app saw the attack's requests: ${attacks.join(', ')}`);
    }
    if (!seen.some((line) => line.includes('from=own')) || !seen.includes('GET /?from=link')) {
      throw new Error(`the victim's log lacks its own requests: ${seen.join(', ')}`);
    }
  });

  await step("the victim's own page still works", () => ownPageWorks(victim, 'victim'));

  process.stdout.write(`${JSON.stringify({ result: 'PASS', attack: result })}\n`);
  exitCode = 0;
} catch (e) {
  process.stderr.write(`[browser] FAIL: ${e && e.stack ? e.stack : e}\n`);
} finally {
  if (browser) await browser.close();
}
process.exit(exitCode);
