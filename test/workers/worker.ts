/**
 * The test entry: the real Worker plus two probe Durable Objects that exercise the Transport
 * over real Durable Object RPC.
 */
import { DurableObject } from "cloudflare:workers";
import { ROOT_CONTEXT, SpanStatusCode, TraceFlags, context, trace } from "@opentelemetry/api";
import { type Incoming, call, cast, handle } from "../../src/transport/index.ts";
import { useSpanExporter } from "../../src/telemetry/index.ts";
import { installTestTracing, recordedSpans } from "./tracing.ts";

export * from "../../src/index.ts";
export { default } from "../../src/index.ts";

installTestTracing();
// guildwire's own services record into the same in-memory exporter instead of exporting OTLP.
useSpanExporter(recordedSpans);

export interface ProbeEnv {
  PROBE_SENDER: DurableObjectNamespace<ProbeSender>;
  PROBE_RECEIVER: DurableObjectNamespace<ProbeReceiver>;
}

export interface Delivery {
  /** Exactly what arrived over RPC, before normalizing, as JSON text. */
  raw: string;
  /** What the handler was given, as JSON text. */
  message: string;
  span: { traceId: string; spanId: string; parentSpanId: string | undefined; name: string } | null;
}

export interface SendResult {
  senderTraceId: string;
  senderSpanId: string;
  delivery: Delivery;
}

export class ProbeReceiver extends DurableObject<ProbeEnv> {
  received: Delivery[] = [];

  receive(incoming: Incoming<unknown>): Delivery {
    const delivery = handle(incoming, "probe.receive", (message) => {
      const span = trace.getActiveSpan() as (ReturnType<typeof trace.getActiveSpan> & { name?: string; parentSpanContext?: { spanId: string } }) | undefined;
      return {
        raw: JSON.stringify(incoming),
        message: JSON.stringify(message),
        span: span
          ? {
              traceId: span.spanContext().traceId,
              spanId: span.spanContext().spanId,
              parentSpanId: span.parentSpanContext?.spanId,
              name: span.name ?? "",
            }
          : null,
      };
    });
    this.received.push(delivery);
    return delivery;
  }

  explode(incoming: Incoming<unknown>): never {
    return handle(incoming, "probe.explode", () => {
      throw new Error("receiver exploded");
    });
  }

  deliveries(): Delivery[] {
    return this.received;
  }
}

export class ProbeSender extends DurableObject<ProbeEnv> {
  private receiver() {
    return this.env.PROBE_RECEIVER.get(this.env.PROBE_RECEIVER.idFromName("receiver"));
  }

  /** Sends `message` inside a span whose parent has the given sampled flag. */
  async send(message: { content: string }, sampled: boolean, mode: "envelope" | "bare" = "envelope"): Promise<SendResult> {
    const parent = trace.setSpanContext(ROOT_CONTEXT, {
      traceId: "0af7651916cd43dd8448eb211c80319c",
      spanId: "b7ad6b7169203331",
      traceFlags: sampled ? TraceFlags.SAMPLED : TraceFlags.NONE,
      isRemote: true,
    });
    return context.with(parent, () =>
      trace.getTracer("probe").startActiveSpan("probe.send", async (span) => {
        try {
          const delivery = await call(this.receiver(), "receive", message, { mode });
          return { senderTraceId: span.spanContext().traceId, senderSpanId: span.spanContext().spanId, delivery };
        } finally {
          span.end();
        }
      }),
    );
  }

  /** Casts to a method that throws; reports what the sender saw. */
  async castToFailure(): Promise<{ onErrorCalled: string | null; senderStatus: SpanStatusCode | undefined }> {
    let onErrorCalled: string | null = null;
    let status: SpanStatusCode | undefined;
    const parent = trace.setSpanContext(ROOT_CONTEXT, {
      traceId: "0af7651916cd43dd8448eb211c80319c",
      spanId: "b7ad6b7169203331",
      traceFlags: TraceFlags.SAMPLED,
      isRemote: true,
    });
    await context.with(parent, () =>
      trace.getTracer("probe").startActiveSpan("probe.cast", async (span) => {
        await cast(this.receiver(), "explode", { boom: true }, {
          onError: (error) => {
            onErrorCalled = error instanceof Error ? error.message : String(error);
          },
        });
        status = (span as unknown as { status: { code: SpanStatusCode } }).status.code;
        span.end();
      }),
    );
    return { onErrorCalled, senderStatus: status };
  }

  /** A cast with no onError must not surface as an unhandled rejection. */
  async castAndForget(): Promise<string> {
    void cast(this.receiver(), "explode", { boom: true });
    await scheduler.wait(50);
    return "still alive";
  }
}
