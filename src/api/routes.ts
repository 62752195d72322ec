import type { Env } from "../env.ts";
import { isDevelopment } from "../env.ts";
import { deliveryConfig } from "../guild/delivery.ts";
import { messageRetention } from "../guild/guild.ts";
import { CONTENT_RULE, type GuildResult, isValidContent } from "../guild/events.ts";
import { call, parseTransportMode } from "../transport/index.ts";
import { authSecret } from "./auth.ts";
import { type Claims, DEFAULT_TOKEN_TTL_SECONDS, isValidId, signToken, verifyToken } from "./tokens.ts";
import { HttpError, errorResponse, json, readJsonObject } from "./http.ts";
import { withServerSpan } from "./tracing.ts";
import { type Telemetry, telemetryFor } from "../telemetry/index.ts";

/**
 * The Worker's HTTP API (CONTRACT.md). Routes read top to bottom; every failure is an
 * `HttpError` turned into `{"error": {"code", "message"}}` in one place.
 */
export async function handleRequest(request: Request, env: Env, ctx: ExecutionContext): Promise<Response> {
  let telemetry: Telemetry;
  try {
    telemetry = telemetryFor("guildwire-api", env);
    // The objects refuse to start on a bad fanout, transport or tracing setting; name it here
    // (for `/gateway` too) instead of answering internal_error for every request they would serve.
    // Without a usable AUTH_SECRET nothing can be served either.
    if (!checkedSettings.has(env)) {
      deliveryConfig(env);
      messageRetention(env);
      requireSecret(env); // else /gateway would upgrade, then close every IDENTIFY 4004 as if the token were bad
      checkedSettings.add(env);
    }
  } catch (error) {
    // A bad setting (TRACE_SAMPLE_RATE, FANOUT_SAMPLING, RELAY_SIZE, …): say so, don't crash.
    return errorResponse(new HttpError(500, "server_misconfigured", error instanceof Error ? error.message : String(error)));
  }
  // Only the API's routes are traced: `/gateway` hands the socket to its session, which has none.
  if (!new URL(request.url).pathname.startsWith("/api/")) return respond(request, env);
  return withServerSpan(
    request,
    telemetry,
    (promise) => ctx.waitUntil(promise),
    () => respond(request, env),
    () => authenticate(request, env).then(
      () => true,
      () => false,
    ),
  );
}

/** Environments whose fanout and transport settings parsed (the Worker's env lives as long as its isolate). */
const checkedSettings = new WeakSet<Env>();

async function respond(request: Request, env: Env): Promise<Response> {
  const response = await answer(request, env);
  // HEAD is GET without the body (RFC 9110 §9.3.2): same status and headers.
  return request.method === "HEAD" ? new Response(null, response) : response;
}

async function answer(request: Request, env: Env): Promise<Response> {
  try {
    return await route(request, env);
  } catch (error) {
    if (error instanceof HttpError) return errorResponse(error);
    console.error("unhandled error in API:", error);
    return errorResponse(new HttpError(500, "internal_error", "something went wrong on our side"));
  }
}

async function route(request: Request, env: Env): Promise<Response> {
  const url = new URL(request.url);
  const path = url.pathname.split("/").filter(Boolean);
  const method = request.method;

  if (url.pathname === "/gateway") {
    allow(method, ["GET"]);
    return openGateway(request, env);
  }

  if (path[0] === "api" && path[1] === "dev" && isDevelopment(env)) {
    if (path[2] === "token" && path.length === 3) {
      allow(method, ["POST"]);
      return issueDevToken(request, env);
    }
    // The benchmark's single-object reference: GET upgrades to a socket, POST broadcasts.
    if (path[2] === "bench-room" && path.length === 4 && isValidId(path[3])) {
      allow(method, ["GET", "POST"]);
      const room = env.BROADCAST_ROOM.get(env.BROADCAST_ROOM.idFromName(path[3]));
      if (method === "GET" || method === "HEAD") return method === "GET" && request.headers.get("Upgrade")?.toLowerCase() === "websocket" ? room.fetch(request) : upgradeRequired(request);
      // Read (size-capped) and checked here, like any other body, before the room sees it.
      const { content } = await readJsonObject(request);
      if (!isValidContent(content)) throw new HttpError(400, "invalid_content", CONTENT_RULE);
      return room.fetch(request.url, { method: "POST", body: JSON.stringify({ content }) });
    }
  }

  if (path[0] === "api" && path[1] === "guilds" && path.length >= 4) {
    const guildId = path[2]!;
    if (!isValidId(guildId)) throw new HttpError(400, "invalid_id", "guild id must be 1–64 characters of [A-Za-z0-9_-]");
    const guild = env.GUILD.get(env.GUILD.idFromName(guildId));

    if (path[3] === "members" && path.length === 5) {
      allow(method, ["PUT", "DELETE"]);
      const userId = path[4]!;
      if (!isValidId(userId)) throw new HttpError(400, "invalid_id", "user id must be 1–64 characters of [A-Za-z0-9_-]");
      await requireAdmin(request, env);
      if (method === "PUT") {
        const { added } = unwrap(await guild.addMember(guildId, userId));
        return json({ guild_id: guildId, user_id: userId }, added ? 201 : 200);
      }
      unwrap(await guild.removeMember(guildId, userId));
      return new Response(null, { status: 204 });
    }

    if (path[3] === "messages" && path.length === 4) {
      allow(method, ["GET", "POST"]);
      const claims = await authenticate(request, env);
      if (method === "POST") {
        const body = await readJsonObject(request);
        const content = body.content;
        if (!isValidContent(content)) throw new HttpError(400, "invalid_content", CONTENT_RULE);
        const idempotencyKey = request.headers.get("Idempotency-Key") ?? undefined;
        if (idempotencyKey !== undefined && !isValidId(idempotencyKey)) {
          throw new HttpError(400, "invalid_idempotency_key", "Idempotency-Key must be 1–64 characters of [A-Za-z0-9_-] (a UUID will do)");
        }
        const mode = parseTransportMode(env.TRANSPORT_MODE);
        const post = { guildId, authorId: claims.sub, content, ...(idempotencyKey === undefined ? {} : { idempotencyKey }) };
        const message = unwrap(await call(guild, "createMessage", post, { mode }));
        return json(message, 201);
      }
      const after = integerParam(url, "after", 0, 0, Number.MAX_SAFE_INTEGER);
      const limit = integerParam(url, "limit", 50, 1, 100);
      return json(unwrap(await guild.history(guildId, claims.sub, after, limit)));
    }

    if (path[3] === "timings" && path.length === 4) {
      allow(method, ["GET"]);
      await requireAdmin(request, env);
      return json({ guild_id: guildId, minutes: unwrap(await guild.timingsFor(guildId)) });
    }
  }

  throw new HttpError(404, "not_found", `no route for ${url.pathname}`);
}

function openGateway(request: Request, env: Env): Promise<Response> {
  // Only a GET upgrades (RFC 6455); a HEAD is answered as a GET without an upgrade would be.
  if (request.method !== "GET" || request.headers.get("Upgrade")?.toLowerCase() !== "websocket") upgradeRequired(request);
  // A new object per connection; its id is the session id clients resume with.
  return env.SESSION.get(env.SESSION.newUniqueId()).fetch(request);
}

function upgradeRequired(request: Request): never {
  throw new HttpError(426, "upgrade_required", `GET ${new URL(request.url).pathname} expects a WebSocket upgrade`, { Upgrade: "websocket" });
}

async function issueDevToken(request: Request, env: Env): Promise<Response> {
  const body = await readJsonObject(request);
  if (!isValidId(body.user_id)) throw new HttpError(400, "invalid_id", "user_id must be 1–64 characters of [A-Za-z0-9_-]");
  if (body.admin !== undefined && typeof body.admin !== "boolean") throw new HttpError(400, "invalid_body", "admin must be a boolean");
  const claims: Claims = {
    sub: body.user_id,
    role: body.admin === true ? "admin" : "user",
    exp: Math.floor(Date.now() / 1000) + DEFAULT_TOKEN_TTL_SECONDS,
  };
  return json({ token: await signToken(requireSecret(env), claims) });
}

function requireSecret(env: Env): string {
  const secret = authSecret(env);
  if (!secret) throw new HttpError(500, "server_misconfigured", "AUTH_SECRET is not set, shorter than 16 characters, or the development secret outside development (in production use `wrangler secret put AUTH_SECRET`; locally, `npm start` sets ENVIRONMENT=development)");
  return secret;
}

const BEARER = /^Bearer +(\S+) *$/i;

async function authenticate(request: Request, env: Env): Promise<Claims> {
  const secret = requireSecret(env);
  const header = request.headers.get("Authorization");
  const token = header && BEARER.exec(header)?.[1]; // the scheme is case-insensitive (RFC 9110 §11.1)
  if (!token) throw new HttpError(401, "unauthorized", "missing Authorization: Bearer <token>", { "WWW-Authenticate": "Bearer" });
  const claims = await verifyToken(secret, token);
  if (!claims) throw new HttpError(401, "invalid_token", "token is invalid or expired", { "WWW-Authenticate": "Bearer" });
  return claims;
}

async function requireAdmin(request: Request, env: Env): Promise<Claims> {
  const claims = await authenticate(request, env);
  if (claims.role !== "admin") throw new HttpError(403, "forbidden", "this route is for admins");
  return claims;
}

/** Refuses a method the route does not serve; a route that serves GET serves HEAD too. */
function allow(method: string, routeMethods: string[]): void {
  const methods = routeMethods.includes("GET") ? [...routeMethods, "HEAD"] : routeMethods;
  if (!methods.includes(method)) {
    throw new HttpError(405, "method_not_allowed", `use ${methods.join(" or ")}`, { Allow: methods.join(", ") });
  }
}

function integerParam(url: URL, name: string, fallback: number, min: number, max: number): number {
  const raw = url.searchParams.get(name);
  if (raw === null) return fallback;
  const value = Number(raw);
  if (!/^\d+$/.test(raw) || !Number.isSafeInteger(value) || value < min || value > max) {
    throw new HttpError(400, "invalid_query", `${name} must be an integer from ${min} to ${max}`);
  }
  return value;
}

function unwrap<T>(result: GuildResult<T>): T {
  if (result.ok) return result.value;
  const { status, code, message, retryAfterSeconds } = result.error;
  throw new HttpError(status, code, message, retryAfterSeconds === undefined ? {} : { "Retry-After": String(retryAfterSeconds) });
}
