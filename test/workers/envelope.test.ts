import { ROOT_CONTEXT, TraceFlags, context, createTraceState, trace } from "@opentelemetry/api";
import { beforeAll, describe, expect, it } from "vitest";
import {
  ENVELOPE_BRAND,
  TRACESTATE_MAX_LENGTH,
  currentCarrier,
  isEnvelope,
  normalize,
  parseTransportMode,
  sanitizeCarrier,
  sanitizeTracestate,
  wrap,
} from "../../src/transport/index.ts";
import { installTestTracing } from "./tracing.ts";

const TRACE = "4bf92f3577b34da6a3ce929d0e0e4736";
const SPAN = "00f067aa0ba902b7";
const SAMPLED = `00-${TRACE}-${SPAN}-01`;

function withParent<R>(flags: TraceFlags, fn: () => R, tracestate?: string): R {
  const ctx = trace.setSpanContext(ROOT_CONTEXT, {
    traceId: TRACE,
    spanId: SPAN,
    traceFlags: flags,
    ...(tracestate ? { traceState: createTraceState(tracestate) } : {}),
  });
  return context.with(ctx, fn);
}

beforeAll(installTestTracing);

describe("wrap", () => {
  const message = { content: "hi" };

  it("returns the bare message when nothing is sampled", () => {
    expect(wrap(message)).toBe(message);
    expect(withParent(TraceFlags.NONE, () => wrap(message))).toBe(message);
  });

  it("wraps a sampled message with the active span's carrier", () => {
    const wrapped = withParent(TraceFlags.SAMPLED, () => wrap(message, { recipients: 3 }), "vendor=abc");
    expect(wrapped).toEqual({
      [ENVELOPE_BRAND]: 1,
      message,
      carrier: { traceparent: SAMPLED, tracestate: "vendor=abc" },
      recipients: 3,
    });
  });

  it("sends bare in bare mode even when sampled", () => {
    expect(withParent(TraceFlags.SAMPLED, () => wrap(message, { mode: "bare" }))).toBe(message);
  });

  it("uses a carrier built once for a fanout, and null means this recipient is unsampled", () => {
    const carrier = withParent(TraceFlags.SAMPLED, () => currentCarrier())!;
    expect(currentCarrier()).toBeNull();
    expect(carrier).toEqual({ traceparent: SAMPLED });
    const a = wrap(message, { carrier });
    const b = wrap({ other: 1 }, { carrier });
    expect(isEnvelope(a) && isEnvelope(b) && a.carrier === b.carrier).toBe(true);
    expect(withParent(TraceFlags.SAMPLED, () => wrap(message, { carrier: null }))).toBe(message);
  });
});

describe("normalize", () => {
  it("accepts a bare message from an old sender", () => {
    expect(normalize({ content: "x" })).toEqual({ message: { content: "x" } });
    expect(normalize("text")).toEqual({ message: "text" });
    expect(normalize(null)).toEqual({ message: null });
  });

  it("never mistakes a user's {message, carrier} object for an envelope", () => {
    const lookalike = { message: "m", carrier: { traceparent: SAMPLED } };
    expect(normalize<unknown>(lookalike)).toEqual({ message: lookalike });
    expect(isEnvelope<unknown>(lookalike)).toBe(false);
  });

  it("unwraps an envelope and survives a structured clone (as over RPC)", () => {
    const wrapped = withParent(TraceFlags.SAMPLED, () => wrap({ n: 1 }, { recipients: 10 }));
    expect(normalize(structuredClone(wrapped))).toEqual({ message: { n: 1 }, carrier: { traceparent: SAMPLED }, recipients: 10 });
  });

  it("drops an invalid carrier but keeps the message", () => {
    const forged = { [ENVELOPE_BRAND]: 1, message: "m", carrier: { traceparent: "00-zz-01" } };
    expect(normalize<unknown>(forged)).toEqual({ message: "m" });
    const nonsense = { [ENVELOPE_BRAND]: 1, message: "m", carrier: "x", recipients: -4 };
    expect(normalize<unknown>(nonsense)).toEqual({ message: "m" });
  });
});

describe("carrier validation", () => {
  it("forwards only traceparent and tracestate", () => {
    expect(sanitizeCarrier({ traceparent: ` ${SAMPLED} `, tracestate: "a=1", baggage: "secret=1", x: 1 })).toEqual({
      traceparent: SAMPLED,
      tracestate: "a=1",
    });
  });

  it("drops the carrier for an invalid or oversize traceparent", () => {
    expect(sanitizeCarrier({ traceparent: SAMPLED.toUpperCase() })).toBeUndefined();
    expect(sanitizeCarrier({ traceparent: `cc-${TRACE}-${SPAN}-01-${"a".repeat(1000)}` })).toBeUndefined();
    expect(sanitizeCarrier({ tracestate: "a=1" })).toBeUndefined();
    expect(sanitizeCarrier(null)).toBeUndefined();
  });

  it("caps tracestate at 32 members", () => {
    const members = Array.from({ length: 40 }, (_, i) => `k${i}=v${i}`);
    const capped = sanitizeTracestate(members.join(","))!;
    expect(capped.split(",")).toEqual(members.slice(0, 32));
  });

  it("caps tracestate at 512 characters", () => {
    const members = Array.from({ length: 20 }, (_, i) => `k${i}=${"v".repeat(40)}`);
    const capped = sanitizeTracestate(members.join(","))!;
    expect(capped.length).toBeLessThanOrEqual(TRACESTATE_MAX_LENGTH);
    expect(capped.split(",")).toEqual(members.slice(0, capped.split(",").length));
    expect(capped.split(",").length).toBeGreaterThan(5);
  });

  it("cuts a tracestate over 512 characters as W3C asks: members over 128 characters first, then from the end", () => {
    const long = (i: number) => `long${i}=${"v".repeat(150)}`;
    const short = (i: number) => `k${i}=v${i}`;
    const members = [long(0), short(0), long(1), ...Array.from({ length: 40 }, (_, i) => short(i + 1))];
    // The first 32 members, less the two long ones: 30 short ones, well under 512 characters.
    expect(sanitizeTracestate(members.join(","))).toBe([short(0), ...Array.from({ length: 29 }, (_, i) => short(i + 1))].join(","));
    // A long header of valid members (~4,800 characters) is cut, not refused.
    expect(sanitizeTracestate([...Array.from({ length: 31 }, (_, i) => long(i)), "z=1"].join(" , "))).toBe("z=1");
    // Longer than 32 valid members could ever be: not even parsed.
    expect(sanitizeTracestate(`a=1,${"b".repeat(20_000)}=1`)).toBeUndefined();
  });

  it("drops a tracestate with an invalid or duplicate member, keeping the traceparent", () => {
    expect(sanitizeTracestate("a=1,B=2")).toBeUndefined();
    expect(sanitizeTracestate("a=1,a=2")).toBeUndefined();
    expect(sanitizeTracestate("a=1,noequals")).toBeUndefined();
    expect(sanitizeTracestate("a=1, ,b=2")).toBe("a=1,b=2");
    expect(sanitizeTracestate("tenant@vendor=x")).toBe("tenant@vendor=x");
    expect(sanitizeCarrier({ traceparent: SAMPLED, tracestate: "a=1,a=2" })).toEqual({ traceparent: SAMPLED });
  });
});

describe("parseTransportMode", () => {
  it("defaults to envelope and rejects unknown modes", () => {
    expect(parseTransportMode(undefined)).toBe("envelope");
    expect(parseTransportMode("bare")).toBe("bare");
    expect(() => parseTransportMode("wrapped")).toThrow(/TRANSPORT_MODE/);
  });
});
