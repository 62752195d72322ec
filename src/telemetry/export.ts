import { OTLPExporter } from "@microlabs/otel-cf-workers";
import { ExportResultCode } from "@opentelemetry/core";
import type { ReadableSpan, SpanExporter } from "@opentelemetry/sdk-trace-base";

/** Spans held for export at most; beyond it the oldest are dropped (and counted). */
const MAX_PENDING_SPANS = 5_000;

/**
 * Ended spans waiting for export, shared by every service in an isolate (the OTLP payload
 * groups spans by their own resource, so one request carries api, guild and session spans).
 *
 * Why not @microlabs/otel-cf-workers' span processor: it exports a trace only once every span of
 * that trace in the isolate has ended, never for Durable Object RPC methods or hibernated
 * WebSocket handlers, and keeps a per-trace map it never prunes. Here, every ended span is
 * exported within the invocation that ended it: the Worker hands `flush()` to `waitUntil`, and
 * Durable Objects await `flushPending()` before their RPC method returns.
 */
export class SpanExportQueue {
  private pending: ReadableSpan[] = [];
  private dropped = 0;

  constructor(private readonly exporter: SpanExporter) {}

  get hasPending(): boolean {
    return this.pending.length > 0;
  }

  push(span: ReadableSpan): void {
    if (this.pending.length >= MAX_PENDING_SPANS) {
      this.pending.shift();
      this.dropped++;
    }
    this.pending.push(span);
  }

  /**
   * Exports what has ended by the next turn of the event loop (so spans ending together go in
   * one request). Resolves when that export is done; never rejects. Every call makes its own
   * promise and its own export request: the queue is shared by the isolate, but a promise or
   * request begun for one invocation must not be awaited by another.
   */
  async flush(): Promise<void> {
    await scheduler.wait(0);
    const spans = this.pending;
    if (spans.length === 0) return;
    this.pending = [];
    await this.export(spans);
  }

  private export(spans: ReadableSpan[]): Promise<void> {
    return new Promise((resolve) => {
      this.exporter.export(spans, (result) => {
        if (result.code !== ExportResultCode.SUCCESS) {
          console.warn(`trace export of ${spans.length} spans failed (${this.dropped} dropped so far):`, result.error?.message);
        }
        resolve();
      });
    });
  }
}

export function otlpExporter(endpoint: string): SpanExporter {
  return new OTLPExporter({ url: `${endpoint.replace(/\/+$/, "")}/v1/traces` }) as unknown as SpanExporter;
}
