import {
  type Attributes,
  type Context,
  type Span,
  type Tracer,
  ROOT_CONTEXT,
  SpanKind,
  SpanStatusCode,
  context as otelContext,
  createTraceState,
  trace,
} from "@opentelemetry/api";
import { type Carrier, isSampledCarrier } from "./carrier.ts";
import { type Incoming, type Received, type WrapOptions, normalize, wrap } from "./envelope.ts";
import { parseTraceparent } from "./traceparent.ts";

/** A stub (or any object) whose `method` takes one message, bare or wrapped. */
export type Receiver<K extends PropertyKey, M> = { [P in K]: (incoming: Incoming<M>) => unknown };

type Reply<S, K extends keyof S> = S[K] extends (...args: never[]) => infer R ? Awaited<R> : never;

/** Drop-in for `await stub[method](message)` that carries trace context when sampled. */
export async function call<K extends PropertyKey, M, S extends Receiver<K, M>>(
  stub: S,
  method: K,
  message: M,
  options?: WrapOptions,
): Promise<Reply<S, K>> {
  return (await stub[method](wrap(message, options))) as Reply<S, K>;
}

export interface CastOptions extends WrapOptions {
  /** Called when the send fails; by default the failure is logged. It never rejects. */
  onError?: (error: unknown) => void;
}

/**
 * Fire-and-forget send. A failure is recorded on the sender's span (when sampled) and handed to
 * `onError` (or logged); it never becomes an unhandled rejection. Returns the settled promise
 * for callers that want to hand it to `waitUntil`.
 */
export function cast<K extends PropertyKey, M, S extends Receiver<K, M>>(
  stub: S,
  method: K,
  message: M,
  options?: CastOptions,
): Promise<void> {
  const span = trace.getActiveSpan();
  return call(stub, method, message, options).then(
    () => undefined,
    (error: unknown) => {
      if (span?.isRecording()) {
        span.recordException(error instanceof Error ? error : String(error));
        span.setStatus({ code: SpanStatusCode.ERROR, message: `cast ${String(method)} failed` });
      }
      if (options?.onError) options.onError(error);
      else console.error(`guildwire transport: cast ${String(method)} failed:`, error);
    },
  );
}

export interface HandleOptions {
  attributes?: Attributes;
  kind?: SpanKind;
  tracer?: Tracer;
  /** Called with every span `handle` ends, e.g. to schedule its export in `waitUntil`. */
  onSpanEnd?: (span: Span) => void;
}

const defaultTracer = (): Tracer => trace.getTracer("guildwire.transport");

/** The remote parent context a sampled carrier describes, or `undefined`. */
export function contextFromCarrier(carrier: Carrier | undefined): Context | undefined {
  if (!isSampledCarrier(carrier)) return undefined;
  const parent = parseTraceparent(carrier.traceparent);
  if (!parent) return undefined;
  return trace.setSpanContext(ROOT_CONTEXT, {
    traceId: parent.traceId,
    spanId: parent.spanId,
    traceFlags: parent.flags,
    isRemote: true,
    ...(carrier.tracestate ? { traceState: createTraceState(carrier.tracestate) } : {}),
  });
}

/**
 * Receiving side of `call`/`cast`: normalizes `incoming` and runs `fn` with the bare message.
 * With a sampled carrier, `fn` runs inside a span `spanName` that continues the sender's trace.
 * Without one it runs as is: no span, no context — a receiver can never start a trace.
 */
export function handle<M, R>(
  incoming: Incoming<M>,
  spanName: string,
  fn: (message: M, received: Received<M>) => R,
  options?: HandleOptions,
): R {
  const received = normalize(incoming);
  const parent = contextFromCarrier(received.carrier);
  if (!parent) return fn(received.message, received);
  return runInSpan(parent, spanName, options, () => fn(received.message, received));
}

/**
 * Runs `fn` in a new span under `parent`, ending it when `fn` settles and recording a throw or
 * rejection. Shared by `handle` and by receivers that continue a trace from elsewhere.
 */
export function runInSpan<R>(parent: Context, spanName: string, options: HandleOptions | undefined, fn: (span: Span) => R): R {
  const tracer = options?.tracer ?? defaultTracer();
  const span = tracer.startSpan(
    spanName,
    { kind: options?.kind ?? SpanKind.CONSUMER, ...(options?.attributes ? { attributes: options.attributes } : {}) },
    parent,
  );
  const finish = (failed: boolean, error?: unknown): void => {
    if (failed) {
      span.recordException(error instanceof Error ? error : String(error));
      span.setStatus({ code: SpanStatusCode.ERROR });
    }
    span.end();
    options?.onSpanEnd?.(span);
  };
  let result: R;
  try {
    result = otelContext.with(trace.setSpan(parent, span), fn, undefined, span);
  } catch (error) {
    finish(true, error);
    throw error;
  }
  if (result instanceof Promise) {
    return result.then(
      (value: unknown) => {
        finish(false);
        return value;
      },
      (error: unknown) => {
        finish(true, error);
        throw error;
      },
    ) as R;
  }
  finish(false);
  return result;
}
