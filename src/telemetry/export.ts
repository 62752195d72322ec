import { type ExportResult, ExportResultCode } from "@opentelemetry/core";
import { JsonTraceSerializer } from "@opentelemetry/otlp-transformer";
import type { ReadableSpan, SpanExporter } from "@opentelemetry/sdk-trace-base";

/** How long one export may take by default (OTEL_EXPORTER_OTLP_TIMEOUT, as in the OTel SDKs). */
export const DEFAULT_EXPORT_TIMEOUT_MS = 10_000;

/** Spans held for export at most; beyond it the oldest are dropped (and counted). */
const MAX_PENDING_SPANS = 5_000;
/**
 * Spans per export request at most (~46 KB of OTLP/JSON). Small on purpose: with workerd's one
 * thread saturated (the `always` benchmark row), 512-span requests (~180 KB) reached the
 * collector seconds late and their bodies stalled until the timeout cut them off, losing
 * ~2.5% of the row's spans; at 128, 4 requests failed in one run and none in the next two,
 * for 2.7× the requests.
 */
export const MAX_SPANS_PER_EXPORT = 128;
/**
 * Export requests one flush has open at once. Workers allow 6 open connections per invocation
 * and queue the rest; an export's timeout starts with its request, so a request must not be
 * started (and its time spent) waiting behind others: a backed-up queue (5,000 spans, 40
 * requests) goes out 4 at a time, leaving room for the invocation's own fetches.
 */
export const MAX_CONCURRENT_EXPORTS = 4;
/**
 * While exports keep going wrong, a queue logs a warning of a new kind at once and then at most
 * one per this long, saying how many it held back: a collector that is down (or failing every
 * other request) would otherwise log a line per export, which grows with traffic (every traced
 * API request exports). "Works again" comes once a whole interval has passed without a failure.
 */
export const EXPORT_WARNING_INTERVAL_MS = 30_000;

/**
 * Ended spans of one service waiting for export, shared by that service's objects in an isolate
 * (and, for guilds and relays, the delivery spans their sessions handed back).
 *
 * Why not @microlabs/otel-cf-workers' span processor: it exports a trace only once every span of
 * that trace in the isolate has ended, never for Durable Object RPC methods or hibernated
 * WebSocket handlers, and keeps a per-trace map it never prunes. Here, every ended span is
 * exported by the invocation that ended it, in that invocation's `waitUntil` (the Worker's
 * `flush()`, a Durable Object's `exportPending()`), or handed back to the caller that exports it
 * (a session's delivery spans: `takeSpans()` / `adoptSpans()`).
 */
export class SpanExportQueue {
  private pending: ReadableSpan[] = [];
  private dropped = 0;
  /** When a warning of each kind was last logged (none since exports were last found working), and how many were held back since. */
  private readonly warnedAt = new Map<string, number>();
  private warningsHeldBack = 0;
  private lastFailureAt = 0;
  /** When the oldest span waiting was queued (Date.now()); 0 when none waits. */
  private oldestQueuedAt = 0;

  /** `flushTimeoutMs`: how long one flush may keep starting requests (OTEL_EXPORTER_OTLP_TIMEOUT). */
  constructor(
    private readonly exporter: SpanExporter,
    private readonly flushTimeoutMs = DEFAULT_EXPORT_TIMEOUT_MS,
  ) {}

  /** Spans dropped so far: beyond the cap, or left when a flush ran out of time. */
  get droppedCount(): number {
    return this.dropped;
  }

  get pendingCount(): number {
    return this.pending.length;
  }

  /** How long the oldest span has been waiting, in ms (0 when none waits). */
  oldestWaitMs(now = Date.now()): number {
    return this.pending.length === 0 ? 0 : now - this.oldestQueuedAt;
  }

  push(span: ReadableSpan): void {
    if (this.pending.length === 0) this.oldestQueuedAt = Date.now();
    if (this.pending.length >= MAX_PENDING_SPANS) {
      // Drop the oldest tenth at once: one copy per 500 spans, not one per span, when full.
      const drop = MAX_PENDING_SPANS / 10;
      this.pending.splice(0, drop);
      this.dropped += drop;
      this.warn("falling behind", `trace export is falling behind: dropped the oldest ${drop} waiting spans (${this.dropped} so far)`);
    }
    this.pending.push(span);
  }

  /** Removes and returns every span waiting, for another invocation to export. */
  take(): ReadableSpan[] {
    const spans = this.pending;
    this.pending = [];
    return spans;
  }

  /**
   * Exports every span ended so far, at most MAX_SPANS_PER_EXPORT per request and
   * MAX_CONCURRENT_EXPORTS requests at once. Resolves when those exports are done; never
   * rejects. Each call exports what it took, in requests of its own: the queue is shared by the
   * service's objects in the isolate, and a promise or request begun for one invocation must not
   * be awaited by another. No timer before a request: a timer in a Durable Object's `waitUntil`
   * may never fire once the invocation has returned (seen here: the export never ran and its
   * spans were lost); each next request starts when one before it ends. A flush starts no
   * request after `flushTimeoutMs` (the rest are dropped and counted), so a collector that
   * never answers holds a `waitUntil` open for about one timeout, not one per round of requests.
   */
  async flush(): Promise<void> {
    const spans = this.take();
    const deadline = Date.now() + this.flushTimeoutMs;
    let next = 0;
    const sendInTurn = async (): Promise<void> => {
      while (next < spans.length) {
        if (Date.now() >= deadline) {
          const left = spans.length - next;
          next = spans.length;
          this.dropped += left;
          this.warn("out of time", `trace export ran out of time: dropped ${left} spans (${this.dropped} so far)`);
          return;
        }
        const from = next;
        next += MAX_SPANS_PER_EXPORT;
        await this.export(spans.slice(from, from + MAX_SPANS_PER_EXPORT));
      }
    };
    const requests = Math.ceil(spans.length / MAX_SPANS_PER_EXPORT);
    await Promise.all(Array.from({ length: Math.min(MAX_CONCURRENT_EXPORTS, requests) }, sendInTurn));
  }

  /** Logs `message` unless one of the same `kind` went out less than EXPORT_WARNING_INTERVAL_MS ago. */
  private warn(kind: string, message: string, ...details: unknown[]): void {
    const now = Date.now();
    this.lastFailureAt = now;
    if (now - (this.warnedAt.get(kind) ?? -Infinity) < EXPORT_WARNING_INTERVAL_MS) {
      this.warningsHeldBack++;
      return;
    }
    console.warn(message + this.heldBackNote(), ...details);
    this.warnedAt.set(kind, now); // few kinds (see failureKind): nothing to bound
  }

  /** An export went through: after a whole interval without a failure, say so (once). */
  private exportWentThrough(): void {
    if (this.warnedAt.size === 0 || Date.now() - this.lastFailureAt < EXPORT_WARNING_INTERVAL_MS) return;
    console.warn(`trace export works again${this.heldBackNote()}`);
    this.warnedAt.clear();
  }

  /** How many warnings were held back since the last logged (and counts them as told). */
  private heldBackNote(): string {
    const note = this.warningsHeldBack > 0 ? ` [${this.warningsHeldBack} more trace export warnings held back since the last]` : "";
    this.warningsHeldBack = 0;
    return note;
  }

  private export(spans: ReadableSpan[]): Promise<void> {
    return new Promise((resolve) => {
      const done = (error: unknown) => {
        if (error !== undefined) this.warn(failureKind(error), `trace export of ${spans.length} spans failed (${this.dropped} dropped so far):`, error);
        else this.exportWentThrough();
        resolve();
      };
      try {
        this.exporter.export(spans, (result) => done(result.code === ExportResultCode.SUCCESS ? undefined : result.error?.message));
      } catch (error) {
        done(error); // e.g. a span the serializer cannot encode: tracing must not fail the flush
      }
    });
  }
}

/** A failed export's kind, for holding back warnings: the status, a timeout, or anything else (whose wording may differ every time). */
function failureKind(error: unknown): string {
  return /collector answered \d+|no answer within/.exec(String(error))?.[0] ?? "other failure";
}

/** Answers that say "try again": a gateway in front of the collector failed or is restarting. */
const RETRYABLE_STATUS = new Set([502, 503, 504]);

/**
 * OTLP/HTTP with a JSON body to `{endpoint}/v1/traces`. Reads each response to its end so the
 * runtime can reuse the connection; @microlabs/otel-cf-workers' exporter leaves it unread.
 *
 * An export has `timeoutMs` in all (OTEL_EXPORTER_OTLP_TIMEOUT's meaning): a collector that
 * accepts and never answers must not hold every exporting object's `waitUntil` open. Within it,
 * a lost connection (a pooled one the collector closed) or a 502/503/504 gets one more attempt,
 * at once — a timer before it might never fire in a Durable Object's `waitUntil`. A 429 is not
 * retried at once (the collector is shedding load), nor is a timeout (the collector may have
 * taken the spans and be slow to say so).
 */
export function otlpExporter(endpoint: string, timeoutMs = DEFAULT_EXPORT_TIMEOUT_MS, extraHeaders: Record<string, string> = {}): SpanExporter {
  // `{endpoint}/v1/traces`, the path appended to the endpoint's own (its query string kept).
  const target = new URL(endpoint);
  target.pathname = `${target.pathname.replace(/\/+$/, "")}/v1/traces`;
  const url = target.toString();
  const headers = { ...extraHeaders, "content-type": "application/json" };
  const post = async (body: Uint8Array, signal: AbortSignal): Promise<{ ok: boolean; retry: boolean; error?: Error }> => {
    try {
      const response = await fetch(url, { method: "POST", headers, body, signal });
      await response.arrayBuffer();
      if (response.ok) return { ok: true, retry: false };
      return { ok: false, retry: RETRYABLE_STATUS.has(response.status), error: new Error(`collector answered ${response.status}`) };
    } catch (error) {
      if (signal.aborted) return { ok: false, retry: false, error: new Error(`no answer within ${timeoutMs} ms`) };
      return { ok: false, retry: true, error: error instanceof Error ? error : new Error(String(error)) };
    }
  };
  return {
    export(spans: ReadableSpan[], done: (result: ExportResult) => void): void {
      const body = JsonTraceSerializer.serializeRequest(spans)!;
      const signal = AbortSignal.timeout(timeoutMs);
      void (async () => {
        let attempt = await post(body, signal);
        if (!attempt.ok && attempt.retry) attempt = await post(body, signal);
        done(attempt.ok ? { code: ExportResultCode.SUCCESS } : { code: ExportResultCode.FAILED, error: attempt.error! });
      })();
    },
    async shutdown(): Promise<void> {},
  };
}
