/**
 * OpenTelemetry for guildwire: one tracer per service (`guildwire-api`, `guildwire-guild`,
 * `guildwire-session`), spans only for sampled work, OTLP/HTTP export to
 * `{OTEL_EXPORTER_OTLP_ENDPOINT}/v1/traces` within the invocation that ended them — or, for a
 * session's delivery spans, by the guild or relay the session hands them back to.
 *
 * Built from @microlabs/otel-cf-workers' span type and OpenTelemetry's OTLP/JSON serializer
 * rather than otel-cf-workers' `instrument`/`instrumentDO` wrappers, which (rc.52) give Durable
 * Object RPC methods and hibernated WebSocket handlers no spans and no export, build spans for
 * unsampled requests, extract every incoming traceparent in full, keep a never-pruned per-trace
 * map, and register one tracer provider per isolate — so the Worker and the objects sharing its
 * isolate would all report one `service.name`. Our tracers are passed explicitly (no global provider).
 */
import { context } from "@opentelemetry/api";
import { resourceFromAttributes } from "@opentelemetry/resources";
import type { SpanExporter } from "@opentelemetry/sdk-trace-base";
import type { HandleOptions } from "../transport/index.ts";
import { AsyncLocalStorageContextManager } from "./context.ts";
import { positiveIntegerVar } from "../env.ts";
import { DEFAULT_EXPORT_TIMEOUT_MS, MAX_SPANS_PER_EXPORT, SpanExportQueue, otlpExporter } from "./export.ts";
import { type SpanRecord, fromSpanRecord, toSpanRecord } from "./span-record.ts";
import { SampledTracer } from "./tracer.ts";

export type { SpanRecord };

type WaitUntil = { waitUntil(promise: Promise<unknown>): void };

/**
 * A guild's spans older than this are exported at its next message or settled RPC, even while
 * its fanout is still sending.
 */
export const EXPORT_DELAY_MS = 1_000;

export type ServiceName = "guildwire-api" | "guildwire-guild" | "guildwire-session";

export interface TelemetryEnv {
  OTEL_EXPORTER_OTLP_ENDPOINT?: string;
  OTEL_EXPORTER_OTLP_HEADERS?: string;
  OTEL_EXPORTER_OTLP_TIMEOUT?: string;
  TRACE_SAMPLE_RATE?: string;
}

export class Telemetry {
  readonly tracer: SampledTracer;

  constructor(
    readonly service: ServiceName,
    private readonly queue: SpanExportQueue | null,
    rootSampleRate: number,
  ) {
    const resource = resourceFromAttributes({
      "service.name": service,
      "service.namespace": "guildwire",
      "cloud.provider": "cloudflare",
      "telemetry.sdk.name": "@microlabs/otel-cf-workers",
    });
    this.tracer = new SampledTracer(resource, rootSampleRate, queue ? (span) => queue.push(span) : null);
  }

  get enabled(): boolean {
    return this.queue !== null;
  }

  /** Exports every span ended so far; give the promise to the Worker's `waitUntil`. Never rejects. */
  flush(): Promise<void> {
    return this.queue ? this.queue.flush() : Promise.resolve();
  }

  /**
   * For Durable Objects: exports whatever spans are waiting, in `waitUntil`, so the caller does
   * not wait for the collector (a session's delivery RPC holds one of the fanout's in-flight
   * slots; a guild's answer holds up the poster). Since compatibility date 2026-10-01, pending
   * `waitUntil` work keeps a Durable Object running. Nothing waiting, nothing done: the
   * unsampled path costs one check.
   */
  exportPending(ctx: WaitUntil): void {
    if (!this.queue || this.queue.pendingCount === 0) return;
    const flushed = this.queue.flush();
    try {
      ctx.waitUntil(flushed);
    } catch (error) {
      // Tracing must never fail the work it observes; the export is under way regardless.
      console.warn("trace export: waitUntil refused:", error);
    }
  }

  /**
   * For a guild after handing a message to its fanout, and for any fanout as an RPC settles:
   * while the fanout is sending (as it is right after a publish to anyone), exports only once a
   * full request's worth waits or the oldest span has waited EXPORT_DELAY_MS, and otherwise
   * leaves the spans to the fanout's idle hook (`exportPending`); with nothing under way (no
   * recipients), exports now. A burst of sampled messages then costs a few requests instead of
   * one per message from the busiest object, and a fanout that never goes idle still exports.
   */
  exportWhenDue(ctx: WaitUntil, fanoutBusy: boolean): void {
    if (!this.queue || this.queue.pendingCount === 0) return;
    if (fanoutBusy && this.queue.pendingCount < MAX_SPANS_PER_EXPORT && this.queue.oldestWaitMs() < EXPORT_DELAY_MS) return;
    this.exportPending(ctx);
  }

  /**
   * For a callee whose caller exports for it: removes the spans waiting here and returns them
   * as plain data for an RPC result (undefined when there are none, the unsampled case). A
   * session hands its delivery spans to the guild or relay, which sends the spans of many
   * sessions in one request instead of one request per sampled session. The queue is this
   * service's in the isolate, so another session's spans waiting in it may go along too.
   */
  takeSpans(): SpanRecord[] | undefined {
    if (!this.queue || this.queue.pendingCount === 0) return undefined;
    return this.queue.take().map(toSpanRecord);
  }

  /**
   * Queues spans a callee handed back, to go out with this object's next export: when
   * `exportPending` is next called, or at once when a full request's worth is waiting.
   */
  adoptSpans(records: SpanRecord[], ctx: WaitUntil): void {
    if (!this.queue) return;
    for (const record of records) {
      try {
        this.queue.push(fromSpanRecord(record));
      } catch (error) {
        // Not a record this version can read (e.g. from a newer session during a rollout).
        console.warn("trace export: dropping a span record this version cannot read:", error);
      }
    }
    if (this.queue.pendingCount >= MAX_SPANS_PER_EXPORT) this.exportPending(ctx);
  }

  /** Options for the Transport's `handle`: spans recorded by this service's tracer. */
  get handleOptions(): HandleOptions {
    return { tracer: this.tracer };
  }
}

/** Tests record spans in memory instead of exporting them. */
let exporterOverride: SpanExporter | null = null;
export function useSpanExporter(exporter: SpanExporter | null): void {
  exporterOverride = exporter;
  telemetries.clear();
  queues.clear();
}

const queues = new Map<string, SpanExportQueue>();
const telemetries = new Map<string, Telemetry>();

/** Parses TRACE_SAMPLE_RATE (0..1); anything else is a configuration error. */
export function parseSampleRate(value: string | undefined): number {
  if (value === undefined || value === "") return 1;
  const rate = Number(value);
  if (!Number.isFinite(rate) || rate < 0 || rate > 1) throw new Error(`TRACE_SAMPLE_RATE is "${value}"; expected a number from 0 to 1`);
  return rate;
}

/** OTEL_EXPORTER_OTLP_TIMEOUT: milliseconds an export may take in all. */
export const exportTimeout = (env: TelemetryEnv): number =>
  positiveIntegerVar("OTEL_EXPORTER_OTLP_TIMEOUT", env.OTEL_EXPORTER_OTLP_TIMEOUT, DEFAULT_EXPORT_TIMEOUT_MS);

/**
 * OTEL_EXPORTER_OTLP_ENDPOINT: empty (tracing off) or an http(s) base URL; anything else would
 * fail every export, quietly. Credentials belong in OTEL_EXPORTER_OTLP_HEADERS: `fetch` would
 * drop a URL's user:password without a word.
 */
export function parseEndpoint(value: string | undefined): string {
  if (!value) return "";
  let url: URL | undefined;
  try {
    url = new URL(value);
  } catch {
    // reported below
  }
  if (url?.protocol !== "http:" && url?.protocol !== "https:") {
    // The value is not shown: errors reach anonymous clients, and an endpoint may carry a key in its query.
    throw new Error("OTEL_EXPORTER_OTLP_ENDPOINT is not an http:// or https:// URL; set one, or leave it empty to turn tracing off");
  }
  if (url.username || url.password) {
    throw new Error("OTEL_EXPORTER_OTLP_ENDPOINT has credentials in it; send them with OTEL_EXPORTER_OTLP_HEADERS (e.g. Authorization=Basic%20…) instead");
  }
  // Backends show the traces URL; as a base it would send spans to …/v1/traces/v1/traces, each refused.
  if (/\/v1\/traces\/*$/.test(url.pathname)) {
    throw new Error("OTEL_EXPORTER_OTLP_ENDPOINT ends in /v1/traces; give the base URL without it (spans go to {endpoint}/v1/traces)");
  }
  return value;
}

const HEADER_NAME = /^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/;

/**
 * OTEL_EXPORTER_OTLP_HEADERS: `name=value` pairs separated by commas, values percent-encoded
 * (the OpenTelemetry convention), sent with every export — how hosted backends take their API
 * key. A secret: errors name the entry, never its value.
 */
export function parseHeaders(value: string | undefined): Record<string, string> {
  const headers: Record<string, string> = {};
  for (const [index, entry] of (value ?? "").split(",").entries()) {
    if (entry.trim() === "") continue;
    const at = entry.indexOf("=");
    const name = entry.slice(0, Math.max(at, 0)).trim();
    let decoded: string | undefined;
    try {
      decoded = decodeURIComponent(entry.slice(at + 1).trim());
    } catch {
      // reported below
    }
    // Visible ASCII, spaces and tabs only: the runtime logs any other header value in full.
    if (!HEADER_NAME.test(name) || decoded === undefined || !/^[\t\x20-\x7e]*$/.test(decoded)) {
      const which = HEADER_NAME.test(name) ? `"${name}"` : `number ${index + 1}`;
      throw new Error(`OTEL_EXPORTER_OTLP_HEADERS: entry ${which} is not name=value with a percent-encoded value of printable ASCII`);
    }
    headers[name.toLowerCase()] = decoded;
  }
  return headers;
}

/** The telemetry of one service, shared within the isolate. */
export function telemetryFor(service: ServiceName, env: TelemetryEnv): Telemetry {
  const endpoint = parseEndpoint(env.OTEL_EXPORTER_OTLP_ENDPOINT);
  // Only the API starts traces; guilds and sessions continue them or do nothing.
  const rootSampleRate = service === "guildwire-api" ? parseSampleRate(env.TRACE_SAMPLE_RATE) : 0;
  const timeoutMs = exportTimeout(env); // checked on every call: a bad value fails loudly, always
  const headersSetting = env.OTEL_EXPORTER_OTLP_HEADERS ?? "";
  const headers = parseHeaders(headersSetting);
  const key = `${service}|${endpoint}|${headersSetting}|${rootSampleRate}`;
  let telemetry = telemetries.get(key);
  if (!telemetry) {
    context.setGlobalContextManager(new AsyncLocalStorageContextManager()); // no-op if one is set
    // One queue per service: what a session hands back must be its own spans, never spans a
    // guild or relay in the same isolate adopted (they would travel back and forth).
    const queueKey = `${service}|${endpoint}|${headersSetting}`;
    let queue = queues.get(queueKey) ?? null;
    if (!queue && (exporterOverride || endpoint)) {
      queue = new SpanExportQueue(exporterOverride ?? otlpExporter(endpoint, timeoutMs, headers), timeoutMs);
      queues.set(queueKey, queue);
    }
    telemetry = new Telemetry(service, queue, rootSampleRate);
    telemetries.set(key, telemetry);
  }
  return telemetry;
}
