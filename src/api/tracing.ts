import { type Context, ROOT_CONTEXT, type Span, SpanKind, SpanStatusCode, context, trace } from "@opentelemetry/api";
import type { Telemetry } from "../telemetry/index.ts";
import { contextFromCarrier, isSampledTraceparent, isValidTraceparent, sanitizeCarrier } from "../transport/index.ts";

/**
 * Where an API request's trace comes from:
 * - a `Context` holding the caller's span, when it sent a valid *sampled* traceparent (the only
 *   case that is fully parsed: the flags byte decides first);
 * - `null` when it sent a valid unsampled one: no spans here or anywhere downstream;
 * - `undefined` when it sent none, or an invalid one (ignored): head sampling decides.
 */
export function incomingTraceContext(request: Request): Context | null | undefined {
  const traceparent = request.headers.get("traceparent");
  if (traceparent === null) return undefined;
  if (isSampledTraceparent(traceparent)) {
    return contextFromCarrier(sanitizeCarrier({ traceparent, tracestate: request.headers.get("tracestate") ?? undefined }));
  }
  return isValidTraceparent(traceparent) ? null : undefined;
}

/**
 * `/api/guilds/g1/messages` → `/api/guilds/{guild_id}/messages`, for low-cardinality span names;
 * `undefined` for a path no route serves (its span is named by the method alone, as OpenTelemetry
 * advises, so made-up paths cannot make up span names).
 */
export function routeTemplate(pathname: string): string | undefined {
  if (pathname === "/gateway") return pathname;
  const [api, area, id, what, userId, ...rest] = pathname.split("/").filter(Boolean);
  if (api !== "api" || rest.length > 0) return undefined;
  if (area === "dev") {
    if (id === "token" && what === undefined) return "/api/dev/token";
    if (id === "bench-room" && what !== undefined && userId === undefined) return "/api/dev/bench-room/{room_id}";
    return undefined;
  }
  if (area !== "guilds" || id === undefined) return undefined;
  if (what === "members" && userId !== undefined) return "/api/guilds/{guild_id}/members/{user_id}";
  if ((what === "messages" || what === "timings") && userId === undefined) return `/api/guilds/{guild_id}/${what}`;
  return undefined;
}

/**
 * Runs `handler` inside the API's server span when the request is sampled, and exports the span
 * in `waitUntil`. Unsampled requests run with no span and no context at all.
 *
 * A sampled traceparent is honoured only from a caller `trusted` vouches for (one with a valid
 * token): otherwise anyone could have every request traced and exported, whatever
 * TRACE_SAMPLE_RATE says, without an account. From others it is ignored, and head sampling decides.
 */
export async function withServerSpan(
  request: Request,
  telemetry: Telemetry,
  waitUntil: (promise: Promise<unknown>) => void,
  handler: () => Promise<Response>,
  trusted: () => Promise<boolean> = async () => true,
): Promise<Response> {
  let parent = incomingTraceContext(request);
  if (parent === null || !telemetry.enabled) return handler();
  if (parent !== undefined && !(await trusted())) parent = undefined;
  const url = new URL(request.url);
  const route = routeTemplate(url.pathname);
  const parentContext = parent ?? ROOT_CONTEXT;
  const span: Span = telemetry.tracer.startSpan(
    route ? `${request.method} ${route}` : request.method,
    {
      kind: SpanKind.SERVER,
      attributes: { "http.request.method": request.method, "url.path": url.pathname, ...(route ? { "http.route": route } : {}) },
    },
    parentContext,
  );
  if (!span.isRecording()) return handler();
  try {
    const response = await context.with(trace.setSpan(parentContext, span), handler);
    span.setAttribute("http.response.status_code", response.status);
    if (response.status >= 500) span.setStatus({ code: SpanStatusCode.ERROR });
    return response;
  } catch (error) {
    span.recordException(error instanceof Error ? error : String(error));
    span.setStatus({ code: SpanStatusCode.ERROR });
    throw error;
  } finally {
    span.end();
    waitUntil(telemetry.flush());
  }
}
