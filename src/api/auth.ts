/** Which secret signs tokens: none by default, and never the public development one in production. */
import { type Env, isDevelopment } from "../env.ts";
import { DEVELOPMENT_SECRET } from "./tokens.ts";

/** The signing secret, or `null`: there is no default, in development or anywhere else. */
export function authSecret(env: Pick<Env, "AUTH_SECRET" | "ENVIRONMENT">): string | null {
  const secret = env.AUTH_SECRET;
  if (typeof secret !== "string" || secret.length < 16) return null;
  return secret === DEVELOPMENT_SECRET && !isDevelopment(env) ? null : secret;
}
