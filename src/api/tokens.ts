/**
 * Signed tokens: base64url(JSON claims) "." base64url(HMAC-SHA256(claims)).
 * Verification goes through Web Crypto's `verify`, which compares in constant time.
 * Pure Web Crypto, shared with Node (`npm run token`); which secret signs is auth.ts's.
 */

export type Role = "user" | "admin";

export interface Claims {
  /** User id. */
  sub: string;
  role: Role;
  /** Expiry, seconds since the epoch. */
  exp: number;
}

export const DEFAULT_TOKEN_TTL_SECONDS = 24 * 60 * 60;

const ID_PATTERN = /^[A-Za-z0-9_-]{1,64}$/;
/** Ids are 1–64 characters of [A-Za-z0-9_-] (users, guilds). */
export function isValidId(value: unknown): value is string {
  return typeof value === "string" && ID_PATTERN.test(value);
}

const encoder = new TextEncoder();
const keys = new Map<string, Promise<CryptoKey>>();

function hmacKey(secret: string): Promise<CryptoKey> {
  let key = keys.get(secret);
  if (!key) {
    key = crypto.subtle.importKey("raw", encoder.encode(secret), { name: "HMAC", hash: "SHA-256" }, false, ["sign", "verify"]);
    keys.set(secret, key);
  }
  return key;
}

function toBase64Url(bytes: Uint8Array): string {
  let binary = "";
  for (const byte of bytes) binary += String.fromCharCode(byte);
  return btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

function fromBase64Url(text: string): Uint8Array<ArrayBuffer> | null {
  if (!/^[A-Za-z0-9_-]*$/.test(text)) return null;
  try {
    const binary = atob(text.replace(/-/g, "+").replace(/_/g, "/"));
    return Uint8Array.from(binary, (c) => c.charCodeAt(0));
  } catch {
    return null;
  }
}

export async function signToken(secret: string, claims: Claims): Promise<string> {
  const payload = toBase64Url(encoder.encode(JSON.stringify(claims)));
  const signature = await crypto.subtle.sign("HMAC", await hmacKey(secret), encoder.encode(payload));
  return `${payload}.${toBase64Url(new Uint8Array(signature))}`;
}

/** The token's claims when its signature is valid and it has not expired; otherwise `null`. */
export async function verifyToken(secret: string, token: unknown, now = Date.now()): Promise<Claims | null> {
  if (typeof token !== "string" || token.length > 2048) return null;
  const dot = token.indexOf(".");
  if (dot <= 0 || dot !== token.lastIndexOf(".")) return null;
  const payload = token.slice(0, dot);
  const signature = fromBase64Url(token.slice(dot + 1));
  if (!signature) return null;
  const valid = await crypto.subtle.verify("HMAC", await hmacKey(secret), signature, encoder.encode(payload));
  if (!valid) return null;
  const json = fromBase64Url(payload);
  if (!json) return null;
  let claims: unknown;
  try {
    claims = JSON.parse(new TextDecoder().decode(json));
  } catch {
    return null;
  }
  if (typeof claims !== "object" || claims === null) return null;
  const { sub, role, exp } = claims as Record<string, unknown>;
  if (!isValidId(sub) || (role !== "user" && role !== "admin") || typeof exp !== "number") return null;
  if (exp * 1000 <= now) return null;
  return { sub, role, exp };
}

/**
 * The secret `.dev.vars` ships with (public: it is in the repository). Refused outside
 * development (auth.ts), in case `.dev.vars` is uploaded (`wrangler secret bulk .dev.vars`):
 * anyone could sign admin tokens with it. (Development mode itself is not in that file.)
 */
export const DEVELOPMENT_SECRET = "guildwire-development-only-secret-do-not-deploy";
