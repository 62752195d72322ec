/**
 * `AUTH_SECRET=… npm run -s token -- --user alice [--admin] [--ttl SECONDS]`: prints a token
 * signed with AUTH_SECRET, as the gateway verifies it (src/api/tokens.ts; the format is in README).
 * `-s` keeps npm's own banner off stdout, so `TOKEN=$(…)` captures the token alone.
 *
 * Outside development there is no token route: your own backend signs its users' tokens with the
 * secret (`wrangler secret put AUTH_SECRET`), and an operator uses this for an admin token (to
 * add members) or to try a deployment. The secret comes from the environment, not an argument,
 * so it stays out of shell history and process lists.
 */
import { parseArgs } from "node:util";
import { DEFAULT_TOKEN_TTL_SECONDS, DEVELOPMENT_SECRET, isValidId, signToken } from "../src/api/tokens.ts";

const USAGE = "usage: AUTH_SECRET=… npm run -s token -- --user USER_ID [--admin] [--ttl SECONDS]";

function fail(message: string): never {
  console.error(`${message}\n${USAGE}`);
  process.exit(2);
}

function options() {
  try {
    return parseArgs({ options: { user: { type: "string" }, admin: { type: "boolean", default: false }, ttl: { type: "string" } } }).values;
  } catch (error) {
    fail((error as Error).message); // an unknown option, or one without its value
  }
}

function main(): Promise<void> {
  const values = options();
  const secret = process.env.AUTH_SECRET ?? "";
  // The gateway refuses a shorter secret, so a token signed with one would never be accepted.
  if (secret.length < 16) fail("AUTH_SECRET must be set in the environment, at least 16 characters (the gateway's own)");
  if (secret === DEVELOPMENT_SECRET) console.error("note: this is .dev.vars' public development secret; a gateway outside development refuses it");
  if (!isValidId(values.user)) fail("--user must be 1–64 characters of [A-Za-z0-9_-]");
  const ttl = values.ttl === undefined ? DEFAULT_TOKEN_TTL_SECONDS : Number(values.ttl);
  if (!/^\d+$/.test(values.ttl ?? "1") || !Number.isSafeInteger(ttl) || ttl < 1) fail("--ttl must be a whole number of seconds, at least 1");
  return signToken(secret, { sub: values.user, role: values.admin ? "admin" : "user", exp: Math.floor(Date.now() / 1000) + ttl }).then((token) => {
    console.log(token);
  });
}

await main();
