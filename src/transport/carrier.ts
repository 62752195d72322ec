import { type Context, type SpanContext, TraceFlags, context as otelContext, trace } from "@opentelemetry/api";
import { formatTraceparent, isSampledTraceparent, parseTraceparent } from "./traceparent.ts";

/** W3C trace context as it travels inside an envelope. Nothing else is ever forwarded. */
export interface Carrier {
  traceparent: string;
  tracestate?: string;
}

/** W3C limits: at most 32 list members, and we cap the header at 512 characters. */
export const TRACESTATE_MAX_MEMBERS = 32;
export const TRACESTATE_MAX_LENGTH = 512;
/** Members longer than this go first when a tracestate must be cut (W3C Trace Context §3.3.1.5). */
const TRACESTATE_LONG_MEMBER = 128;
/**
 * The longest header 32 valid members can make (keys and values of 256 characters, a space
 * either side of each comma): anything longer is not a list to keep, and is not even parsed.
 */
const TRACESTATE_MAX_HEADER = TRACESTATE_MAX_MEMBERS * (256 + 1 + 256) + (TRACESTATE_MAX_MEMBERS - 1) * 3;
/** A traceparent is 55 characters; a future version may add fields, but not kilobytes. */
const TRACEPARENT_MAX_LENGTH = 256;

const TRACESTATE_KEY = /^(?:[a-z][_0-9a-z\-*/]{0,255}|[a-z0-9][_0-9a-z\-*/]{0,240}@[a-z][_0-9a-z\-*/]{0,13})$/;
const TRACESTATE_VALUE = /^[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]$/;

/**
 * Validates and caps a tracestate header before it is forwarded to thousands of sessions.
 * Invalid members make the whole header invalid (as the W3C spec asks). Past 32 members the rest
 * are dropped; past 512 characters, members over 128 characters are dropped first, then members
 * from the end (the spec's truncation order). Returns `undefined` when nothing valid is left.
 */
export function sanitizeTracestate(header: unknown): string | undefined {
  if (typeof header !== "string" || header.length > TRACESTATE_MAX_HEADER) return undefined;
  let kept: string[] = [];
  const seen = new Set<string>();
  for (const raw of header.split(",")) {
    const member = raw.trim();
    if (member === "") continue;
    const eq = member.indexOf("=");
    const key = member.slice(0, eq);
    if (eq <= 0 || !TRACESTATE_KEY.test(key) || !TRACESTATE_VALUE.test(member.slice(eq + 1))) return undefined;
    if (seen.has(key)) return undefined;
    seen.add(key);
    if (kept.length < TRACESTATE_MAX_MEMBERS) kept.push(member);
  }
  const length = (members: string[]) => members.reduce((n, member) => n + member.length, members.length - 1);
  if (length(kept) > TRACESTATE_MAX_LENGTH) kept = kept.filter((member) => member.length <= TRACESTATE_LONG_MEMBER);
  while (kept.length > 0 && length(kept) > TRACESTATE_MAX_LENGTH) kept.pop();
  return kept.length > 0 ? kept.join(",") : undefined;
}

/**
 * Validates a carrier that arrived from outside this process. Only `traceparent` and
 * `tracestate` survive; an invalid or oversize traceparent drops the whole carrier.
 */
export function sanitizeCarrier(input: unknown): Carrier | undefined {
  if (typeof input !== "object" || input === null) return undefined;
  const { traceparent, tracestate } = input as Record<string, unknown>;
  if (typeof traceparent !== "string" || traceparent.length > TRACEPARENT_MAX_LENGTH) return undefined;
  if (parseTraceparent(traceparent) === null) return undefined;
  const state = tracestate === undefined ? undefined : sanitizeTracestate(tracestate);
  return state === undefined ? { traceparent: traceparent.trim() } : { traceparent: traceparent.trim(), tracestate: state };
}

/** Is this carrier's trace sampled? Reads the flags byte only. */
export function isSampledCarrier(carrier: Carrier | undefined): carrier is Carrier {
  return carrier !== undefined && isSampledTraceparent(carrier.traceparent);
}

/** The sampled span context in `ctx`, or `undefined`: the one check the unsampled path pays. */
export function sampledSpanContext(ctx: Context = otelContext.active()): SpanContext | undefined {
  const spanContext = trace.getSpan(ctx)?.spanContext();
  return spanContext && (spanContext.traceFlags & TraceFlags.SAMPLED) === TraceFlags.SAMPLED ? spanContext : undefined;
}

/**
 * The carrier for the active (or given) context, or `null` when it is not sampled.
 * Build it once per fanout and hand it to every `wrap`: `null` tells `wrap` to send bare
 * without looking at the context again.
 */
export function currentCarrier(ctx?: Context): Carrier | null {
  const spanContext = sampledSpanContext(ctx);
  return spanContext ? carrierFor(spanContext) : null;
}

/** Serializes a span context as a carrier. */
export function carrierFor(spanContext: SpanContext): Carrier {
  const traceparent = formatTraceparent(spanContext.traceId, spanContext.spanId, spanContext.traceFlags & 0xff);
  const tracestate = spanContext.traceState?.serialize();
  return tracestate ? { traceparent, tracestate } : { traceparent };
}
