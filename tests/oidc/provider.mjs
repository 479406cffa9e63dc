// The OpenID provider tests/oidc.rs signs in through: oidc-provider (OpenID Certified), on
// loopback, with its development login pages (any listed person signs in without a password).
//
//   node provider.mjs PORT STATE_DIR [HOST]
//
// It listens on 127.0.0.1; HOST (default 127.0.0.1) is the name in its issuer URL (`localhost`
// makes it another site than a console on 127.0.0.1, as a real provider is).
// STATE_DIR/no-refresh-tokens: if present, no refresh tokens are issued.
// STATE_DIR/clients.json: the clients ([{client_id, client_secret, ...}]), written by the test.
// STATE_DIR/keys.json: the signing keys; made on first start. Started with ROTATE=1, a new key
// is put first (signs from now on) and the old ones are kept (tokens they signed still verify).
// People and their groups are in STATE_DIR/people.json, read at every sign-in and refresh, so a
// test can move someone out of a group while they are signed in.
import { generateKeyPairSync, randomUUID } from 'node:crypto';
import { readFileSync, writeFileSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import Provider from 'oidc-provider';

const [port, dir, host = '127.0.0.1'] = process.argv.slice(2);
const issuer = `http://${host}:${port}`;

function newKey() {
  const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  return { ...privateKey.export({ format: 'jwk' }), kid: randomUUID(), use: 'sig', alg: 'RS256' };
}

const keysFile = join(dir, 'keys.json');
let keys = existsSync(keysFile) ? JSON.parse(readFileSync(keysFile, 'utf8')) : [];
if (keys.length === 0 || process.env.ROTATE === '1') keys = [newKey(), ...keys];
writeFileSync(keysFile, JSON.stringify(keys));

const people = () => JSON.parse(readFileSync(join(dir, 'people.json'), 'utf8'));
const clients = JSON.parse(readFileSync(join(dir, 'clients.json'), 'utf8'));

const provider = new Provider(issuer, {
  clients,
  jwks: { keys },
  // Claims of the requested scopes go into the ID token (pglease reads groups from it).
  conformIdTokenClaims: false,
  claims: {
    openid: ['sub'],
    email: ['email', 'email_verified'],
    profile: ['name', 'preferred_username'],
    groups: ['groups'],
  },
  scopes: ['openid', 'offline_access', 'email', 'profile', 'groups'],
  features: {
    devInteractions: { enabled: true },
    deviceFlow: { enabled: true },
    revocation: { enabled: true },
  },
  // A refresh token for every client allowed the grant (as Okta or Keycloak can be set up),
  // or none when STATE_DIR/no-refresh-tokens exists (as many providers without offline_access).
  issueRefreshToken: async (_ctx, client) => client.grantTypeAllowed('refresh_token') && !existsSync(join(dir, 'no-refresh-tokens')),
  pkce: { required: () => true },
  ttl: {
    // dave's ID tokens expire at once: the expired-token test signs in as dave.
    IdToken: (_ctx, token) => (token.available?.sub === 'dave' ? 1 : 3600),
    AccessToken: 3600,
    AuthorizationCode: 60,
    DeviceCode: 600,
    Grant: 3600,
    Interaction: 600,
    RefreshToken: 86400,
    Session: 3600,
  },
  // Someone no longer in people.json is not found, so their refresh tokens stop working (as
  // when an IdP disables a person).
  async findAccount(_ctx, id) {
    if (!people()[id]) return undefined;
    return {
      accountId: id,
      async claims() {
        const p = people()[id];
        if (!p) return { sub: id };
        return { sub: id, email: `${id}@example.com`, email_verified: true, name: id, preferred_username: id, groups: p.groups };
      },
    };
  },
});
provider.proxy = false;

// Device flow clients are told to poll every second (the default five would slow the tests).
provider.use(async (ctx, next) => {
  await next();
  if (ctx.path === '/device/auth' && ctx.body && typeof ctx.body === 'object') ctx.body.interval = 1;
});

provider.listen(Number(port), '127.0.0.1', () => {
  console.log(`listening ${issuer}`);
});
