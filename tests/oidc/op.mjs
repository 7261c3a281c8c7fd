// A real OpenID provider for jobgate's sign-on tests: panva/oidc-provider (OpenID
// Certified), on loopback with the test CA's certificate, one confidential client (the
// relay), PKCE required, and three users with groups. Its login page is a plain form
// (`login=<user>`) so that tests can drive it with or without a browser; consent is
// given with the login.
//
// Environment: OP_PORT, OP_CERT, OP_KEY, OP_CLIENT_ID, OP_CLIENT_SECRET, OP_REDIRECT_URI.
// Prints "op ready <issuer>" on stdout once it listens.
import https from 'node:https';
import fs from 'node:fs';
import Provider from 'oidc-provider';

const env = process.env;
const issuer = `https://localhost:${env.OP_PORT}`;
const USERS = { alice: ['astro'], bob: ['physics'], carol: ['physics'] };

const provider = new Provider(issuer, {
  clients: [{
    client_id: env.OP_CLIENT_ID,
    client_secret: env.OP_CLIENT_SECRET,
    redirect_uris: [env.OP_REDIRECT_URI],
    grant_types: ['authorization_code'],
    response_types: ['code'],
  }],
  pkce: { required: () => true },
  features: { devInteractions: { enabled: false } },
  claims: { openid: ['sub'], profile: ['preferred_username', 'groups'], email: ['email'] },
  // Profile claims in the ID token itself (the relay reads no userinfo).
  conformIdTokenClaims: false,
  cookies: { keys: ['jobgate-test-op-only'] },
  findAccount: async (ctx, id) => USERS[id] && {
    accountId: id,
    claims: async () => ({ sub: id, preferred_username: id, email: `${id}@example.org`, groups: USERS[id] }),
  },
  interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
});
provider.proxy = false;

const readBody = (req) => new Promise((resolve, reject) => {
  let data = '';
  req.on('data', (chunk) => { data += chunk; if (data.length > 4096) reject(new Error('too long')); });
  req.on('end', () => resolve(data));
  req.on('error', reject);
});

const callback = provider.callback();
const server = https.createServer({ cert: fs.readFileSync(env.OP_CERT), key: fs.readFileSync(env.OP_KEY) }, async (req, res) => {
  const path = new URL(req.url, issuer).pathname;
  if (!/^\/interaction\/[^/]+(\/login)?$/.test(path)) return callback(req, res);
  try {
    const details = await provider.interactionDetails(req, res);
    if (req.method === 'GET') {
      res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
      res.end(`<!doctype html><title>Test OP sign-in</title><form method="post" action="/interaction/${details.uid}/login">`
        + '<input name="login" autofocus><button type="submit">Sign in</button></form>');
      return;
    }
    const login = new URLSearchParams(await readBody(req)).get('login');
    if (!USERS[login]) { res.writeHead(403); res.end('unknown user'); return; }
    const grant = new provider.Grant({ accountId: login, clientId: details.params.client_id });
    grant.addOIDCScope(details.params.scope);
    const grantId = await grant.save();
    await provider.interactionFinished(req, res, { login: { accountId: login }, consent: { grantId } }, { mergeWithLastSubmission: false });
  } catch (e) {
    res.writeHead(400, { 'content-type': 'text/plain' });
    res.end(`interaction failed: ${e.message}`);
  }
});
server.listen(Number(env.OP_PORT), '127.0.0.1', () => console.log(`op ready ${issuer}`));
process.on('SIGTERM', () => process.exit(0));
