// Drives Debian's Chromium (headless, via playwright-core) through single sign-on with a
// real OpenID provider: run by signon-browser.sh, which starts the provider, the relay,
// two of alice's jobs (one shared with bob) and a `jobgate login`.
//
// Environment: JG_OWN_URL, JG_SHARED_URL, JG_LOGIN_URL, JG_OP_ORIGIN, JG_DOMAIN, JG_SPKI,
// JG_NODE_PREFIX, JG_CHROMIUM [/usr/bin/chromium].

import { env, launchChromium, step } from './browser.mjs';

const OWN_URL = env('JG_OWN_URL');
const SHARED_URL = env('JG_SHARED_URL');
const LOGIN_URL = env('JG_LOGIN_URL');
const OP_ORIGIN = env('JG_OP_ORIGIN');
const DOMAIN = env('JG_DOMAIN');
const SPKI = env('JG_SPKI');

const check = (ok, what) => { if (!ok) throw new Error(what); };

const browser = await launchChromium({ domain: DOMAIN, spki: SPKI });
let exitCode = 1;
try {
  const person = async () => {
    const context = await browser.newContext({ ignoreHTTPSErrors: false });
    const page = await context.newPage();
    page.setDefaultTimeout(60_000);
    const opHits = { count: 0 };
    page.on('request', (r) => { if (r.url().startsWith(OP_ORIGIN)) opHits.count += 1; });
    return { context, page, opHits };
  };
  // Opens `url`; signs in at the provider as `user` if its form shows up.
  const open = async (page, url, user) => {
    let response = await page.goto(url, { waitUntil: 'domcontentloaded' });
    if (page.url().startsWith(OP_ORIGIN)) {
      await page.fill('input[name=login]', user);
      [response] = await Promise.all([
        page.waitForNavigation({ url: (u) => !u.href.startsWith(OP_ORIGIN), waitUntil: 'domcontentloaded' }),
        page.click('button[type=submit]'),
      ]);
      response = await page.waitForLoadState('domcontentloaded').then(() => response);
    }
    return response;
  };
  const ownHost = new URL(OWN_URL).host;

  const alice = await person();
  await step('alice opens her job: provider login, back on the exact page', async () => {
    await open(alice.page, OWN_URL, 'alice');
    check(alice.page.url() === OWN_URL, `ended at ${alice.page.url()}, not ${OWN_URL}`);
    check(alice.opHits.count > 0, 'the provider was never visited');
    const text = await alice.page.textContent('body');
    check(!/Sign-in|Not your session/.test(text), `not the app: ${text.slice(0, 200)}`);
    const cookies = await alice.context.cookies();
    for (const c of cookies) {
      check(!c.domain.startsWith('.'), `a domain cookie: ${c.name} for ${c.domain}`);
    }
    const pass = cookies.filter((c) => c.name === '__Host-jobgate-sso');
    check(pass.length === 1 && pass[0].domain === ownHost.split(':')[0], `passes: ${JSON.stringify(pass)}`);
    check(pass[0].httpOnly && pass[0].secure && pass[0].sameSite === 'Lax', 'pass attributes');
    check(cookies.some((c) => c.name === '__Host-jobgate-login' && c.domain === `login.${DOMAIN}`), 'no login cookie');
  });
  await step("alice's second job opens without the provider", async () => {
    const before = alice.opHits.count;
    await open(alice.page, SHARED_URL, 'alice');
    check(alice.opHits.count === before, 'the provider was asked again');
    check(new URL(alice.page.url()).host === new URL(SHARED_URL).host, `ended at ${alice.page.url()}`);
  });

  const bob = await person();
  await step("bob gets 403 on alice's job, naming both", async () => {
    const response = await open(bob.page, OWN_URL, 'bob');
    check(response && response.status() === 403, `status ${response && response.status()}`);
    const text = await bob.page.textContent('body');
    check(text.includes('signed in as bob') && text.includes('belongs to alice'), text);
  });
  await step("'sign in as someone else' asks the provider again, as alice it opens", async () => {
    const other = await person();
    await open(other.page, OWN_URL, 'bob');
    await Promise.all([other.page.waitForNavigation(), other.page.click('a[href="/__jobgate/switch"]')]);
    check(other.page.url().startsWith(OP_ORIGIN), `the provider did not ask again: ${other.page.url()}`);
    const response = await open(other.page, other.page.url(), 'alice');
    check(response && response.status() === 200, `status ${response && response.status()}`);
    check(new URL(other.page.url()).host === ownHost, `ended at ${other.page.url()}`);
    await other.context.close();
  });
  await step('bob gets into the job shared with him', async () => {
    const response = await open(bob.page, SHARED_URL, 'bob');
    check(response && response.status() === 200, `status ${response && response.status()}`);
  });
  await step("bob signs out; his passes end, the shared job goes through the provider again", async () => {
    await bob.page.goto(OWN_URL);
    await Promise.all([bob.page.waitForNavigation(), bob.page.click('a[href="/__jobgate/logout"]')]);
    check((await bob.page.textContent('body')).includes('signed out'), 'no sign-out page');
    const pass = (await bob.context.cookies()).filter((c) => c.name === '__Host-jobgate-sso');
    check(pass.length === 1, 'the shared job still has its pass cookie in the browser');
    // The relay ended that pass too: the next visit goes back to the provider (whose own
    // session may sign bob in again without a prompt: that is the IdP's single sign-on).
    const before = bob.opHits.count;
    await open(bob.page, SHARED_URL, 'bob');
    check(bob.opHits.count > before, 'the ended pass still let bob in');
  });

  const carol = await person();
  await step('jobgate login: carol confirms the code and signs in', async () => {
    await carol.page.goto(LOGIN_URL, { waitUntil: 'domcontentloaded' });
    const code = new URL(LOGIN_URL).searchParams.get('code');
    check((await carol.page.textContent('body')).includes(code), 'the page does not show the code');
    await Promise.all([carol.page.waitForNavigation(), carol.page.click('button[type=submit]')]);
    await open(carol.page, carol.page.url(), 'carol');
    const text = await carol.page.textContent('body');
    check(text.includes('token for carol'), text.slice(0, 300));
  });
  exitCode = 0;
} catch (e) {
  process.stderr.write(`[browser] ${e.stack || e}\n`);
} finally {
  await browser.close();
}
process.exit(exitCode);
