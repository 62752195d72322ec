import {
  type Context,
  type Span,
  type SpanContext,
  type SpanOptions,
  type Tracer,
  INVALID_SPAN_CONTEXT,
  TraceFlags,
  context as otelContext,
  isSpanContextValid,
  trace,
} from "@opentelemetry/api";
import { SpanImpl } from "@microlabs/otel-cf-workers";
import type { Resource } from "@opentelemetry/resources";
import type { ReadableSpan } from "@opentelemetry/sdk-trace-base";

const NOT_RECORDING = trace.wrapSpanContext(INVALID_SPAN_CONTEXT);

function randomHex(bytes: number): string {
  const buffer = crypto.getRandomValues(new Uint8Array(bytes));
  let hex = "";
  for (const byte of buffer) hex += (byte < 16 ? "0" : "") + byte.toString(16);
  return hex;
}

/**
 * A tracer that records only sampled work. A span under a sampled parent is recorded; under an
 * unsampled parent it is a non-recording stand-in that carries the parent's context (so nothing
 * downstream is sampled either); with no parent it starts a trace only at `rootSampleRate` —
 * 0 for the guild and session services, which never start traces of their own.
 */
export class SampledTracer implements Tracer {
  /** `onEnd` receives recorded spans; without one (no exporter configured) nothing is recorded. */
  constructor(
    private readonly resource: Resource,
    private readonly rootSampleRate: number,
    private readonly onEnd: ((span: ReadableSpan) => void) | null,
  ) {}

  startSpan(name: string, options: SpanOptions = {}, ctx: Context = otelContext.active()): Span {
    const parent = options.root ? undefined : trace.getSpanContext(ctx);
    let spanContext: SpanContext;
    if (parent && isSpanContextValid(parent)) {
      if ((parent.traceFlags & TraceFlags.SAMPLED) === 0 || !this.onEnd) return trace.wrapSpanContext(parent);
      // Flags this version does not know are not passed on (W3C Trace Context: set them to zero).
      spanContext = { traceId: parent.traceId, spanId: randomHex(8), traceFlags: TraceFlags.SAMPLED };
      if (parent.traceState) spanContext.traceState = parent.traceState;
    } else {
      if (!this.onEnd || !(Math.random() < this.rootSampleRate)) return NOT_RECORDING;
      spanContext = { traceId: randomHex(16), spanId: randomHex(8), traceFlags: TraceFlags.SAMPLED };
    }
    return new SpanImpl({
      name,
      spanContext,
      ...(parent ? { parentSpanContext: parent, parentSpanId: parent.spanId } : {}),
      ...(options.kind !== undefined ? { spanKind: options.kind } : {}),
      ...(options.startTime !== undefined ? { startTime: options.startTime } : {}),
      ...(options.links ? { links: options.links } : {}),
      attributes: options.attributes ?? {},
      resource: this.resource,
      onEnd: this.onEnd as unknown as (span: Span) => void, // SpanImpl passes itself, a ReadableSpan
    });
  }

  startActiveSpan<F extends (span: Span) => unknown>(name: string, fn: F): ReturnType<F>;
  startActiveSpan<F extends (span: Span) => unknown>(name: string, options: SpanOptions, fn: F): ReturnType<F>;
  startActiveSpan<F extends (span: Span) => unknown>(name: string, options: SpanOptions, ctx: Context, fn: F): ReturnType<F>;
  startActiveSpan<F extends (span: Span) => unknown>(name: string, ...args: unknown[]): ReturnType<F> {
    const fn = args[args.length - 1] as F;
    const options = (args.length > 1 ? args[0] : {}) as SpanOptions;
    const ctx = (args.length > 2 ? args[1] : otelContext.active()) as Context;
    const span = this.startSpan(name, options, ctx);
    return otelContext.with(trace.setSpan(ctx, span), () => fn(span)) as ReturnType<F>;
  }
}
