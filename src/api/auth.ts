/** Which secret signs tokens: none by default, and never the public development one in production. */
import { type Env, isDevelopment } from "../env.ts";

/**
 * The secret `.dev.vars` ships with (public: it is in the repository). Refused outside
 * development, in case `.dev.vars` is uploaded (`wrangler secret bulk .dev.vars`): anyone could
 * sign admin tokens with it. (Development mode itself is not in that file, so it cannot come along.)
 */
const DEVELOPMENT_SECRET = "guildwire-development-only-secret-do-not-deploy";

/** The signing secret, or `null`: there is no default, in development or anywhere else. */
export function authSecret(env: Pick<Env, "AUTH_SECRET" | "ENVIRONMENT">): string | null {
  const secret = env.AUTH_SECRET;
  if (typeof secret !== "string" || secret.length < 16) return null;
  return secret === DEVELOPMENT_SECRET && !isDevelopment(env) ? null : secret;
}
