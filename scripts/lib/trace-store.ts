/**
 * The collector's traces: spans grouped by trace id as batches arrive (one trace's spans come in
 * several requests, from several services), kept in memory and mirrored to disk as one JSON file
 * per trace, written shortly after a change. Only the most recently updated traces are kept.
 */
import { mkdirSync, readFileSync, readdirSync } from "node:fs";
import { rename, unlink, writeFile } from "node:fs/promises";
import { join } from "node:path";
import type { SpanRecord } from "./otlp.ts";

export const TRACE_ID = /^[0-9a-f]{32}$/;

export interface TraceSummary {
  traceId: string;
  /** The earliest span without a parent in this trace (its parent may be remote). */
  rootName: string;
  rootService: string;
  services: string[];
  spanCount: number;
  errorCount: number;
  startTime: string;
  startTimeUnixNano: string;
  durationMs: number;
  /**
   * Recipients from the first span with `messaging.batch.message_count` (the guild's fanout), if
   * any; sampled, summed over every span that counts them (the guild's, or each relay's share).
   */
  fanout: { recipients: number; sampled: number | null } | null;
}

export interface SpanView extends SpanRecord {
  startTime: string;
  /** From the start of the trace. */
  offsetMs: number;
  durationMs: number;
}

export interface TraceDetail extends TraceSummary {
  spans: SpanView[];
}

interface StoredTrace {
  traceId: string;
  spans: Map<string, SpanRecord>;
  /** Order of the last update, for pruning (larger = newer). */
  updated: number;
  updatedAt: number;
  summary: TraceSummary | null;
}

interface TraceFile {
  traceId: string;
  updatedAt: number;
  /** Update order across restarts (timestamps tie within a millisecond). */
  order?: number;
  spans: SpanRecord[];
}

export interface TraceStoreOptions {
  maxTraces?: number;
  maxSpansPerTrace?: number;
  /** How long changes wait before they are written (ms). */
  writeDelayMs?: number;
}

const nsToMs = (ns: bigint): number => Number(ns) / 1e6;

export function isoTime(unixNano: string | bigint): string {
  const date = new Date(Number(BigInt(unixNano) / 1_000_000n));
  return Number.isNaN(date.getTime()) ? "" : date.toISOString();
}

export class TraceStore {
  private readonly traces = new Map<string, StoredTrace>();
  private readonly dirty = new Set<string>();
  private readonly removed = new Set<string>();
  private readonly maxTraces: number;
  private readonly maxSpansPerTrace: number;
  private readonly writeDelayMs: number;
  private counter = 0;
  private timer: NodeJS.Timeout | null = null;
  private writing: Promise<void> = Promise.resolve();
  /** Spans refused because their trace was full. */
  droppedSpans = 0;

  readonly dir: string;

  constructor(dir: string, options: TraceStoreOptions = {}) {
    this.dir = dir;
    this.maxTraces = options.maxTraces ?? 500;
    this.maxSpansPerTrace = options.maxSpansPerTrace ?? 20_000;
    this.writeDelayMs = options.writeDelayMs ?? 100;
  }

  /** Reads the traces already on disk (unreadable files are skipped), oldest update first. */
  load(): void {
    mkdirSync(this.dir, { recursive: true });
    const files: TraceFile[] = [];
    for (const name of readdirSync(this.dir)) {
      const match = /^([0-9a-f]{32})\.json$/.exec(name);
      if (!match) continue;
      try {
        const file = JSON.parse(readFileSync(join(this.dir, name), "utf8")) as TraceFile;
        if (file.traceId === match[1] && Array.isArray(file.spans)) files.push(file);
      } catch {
        // a half-written or foreign file: ignore it
      }
    }
    const order = (file: TraceFile): number => (typeof file.order === "number" ? file.order : 0);
    files.sort((a, b) => order(a) - order(b) || (a.updatedAt ?? 0) - (b.updatedAt ?? 0));
    for (const file of files) {
      const spans = new Map<string, SpanRecord>();
      for (const span of file.spans) if (isSpanRecord(span) && span.traceId === file.traceId) spans.set(span.spanId, span);
      if (spans.size === 0) continue;
      this.counter = Math.max(this.counter + 1, order(file));
      this.traces.set(file.traceId, { traceId: file.traceId, spans, updated: this.counter, updatedAt: file.updatedAt ?? 0, summary: null });
    }
    this.prune();
  }

  get size(): number {
    return this.traces.size;
  }

  /** Merges spans into their traces (a span id seen again replaces the earlier copy). */
  add(spans: SpanRecord[]): void {
    const now = Date.now();
    for (const span of spans) {
      let trace = this.traces.get(span.traceId);
      if (!trace) {
        trace = { traceId: span.traceId, spans: new Map(), updated: 0, updatedAt: 0, summary: null };
        this.traces.set(span.traceId, trace);
      }
      if (trace.spans.size >= this.maxSpansPerTrace && !trace.spans.has(span.spanId)) {
        this.droppedSpans++;
        continue;
      }
      trace.spans.set(span.spanId, span);
      trace.summary = null;
      // Move to the end of the map: iteration order is update order, oldest first.
      this.traces.delete(span.traceId);
      this.traces.set(span.traceId, trace);
      trace.updated = ++this.counter;
      trace.updatedAt = now;
      this.dirty.add(span.traceId);
      this.removed.delete(span.traceId);
    }
    this.prune();
    this.scheduleWrite();
  }

  /** Recent traces, newest start first. */
  list(limit = Infinity): TraceSummary[] {
    const summaries = [...this.traces.values()].map((trace) => this.summary(trace));
    summaries.sort((a, b) => {
      const byStart = BigInt(b.startTimeUnixNano) - BigInt(a.startTimeUnixNano);
      return byStart > 0n ? 1 : byStart < 0n ? -1 : a.traceId.localeCompare(b.traceId);
    });
    return summaries.slice(0, limit);
  }

  get(traceId: string): TraceDetail | null {
    const trace = this.traces.get(traceId);
    if (!trace) return null;
    const summary = this.summary(trace);
    const traceStart = BigInt(summary.startTimeUnixNano);
    const spans = sortedSpans(trace).map((span) => ({
      ...span,
      startTime: isoTime(span.startTimeUnixNano),
      offsetMs: nsToMs(BigInt(span.startTimeUnixNano) - traceStart),
      durationMs: nsToMs(BigInt(span.endTimeUnixNano) - BigInt(span.startTimeUnixNano)),
    }));
    return { ...summary, spans };
  }

  /** Writes every pending change now. */
  flush(): Promise<void> {
    if (this.timer) {
      clearTimeout(this.timer);
      this.timer = null;
    }
    const dirty = [...this.dirty];
    const removed = [...this.removed];
    this.dirty.clear();
    this.removed.clear();
    this.writing = this.writing.then(() => this.write(dirty, removed));
    return this.writing;
  }

  private scheduleWrite(): void {
    if (this.timer || (this.dirty.size === 0 && this.removed.size === 0)) return;
    this.timer = setTimeout(() => {
      this.timer = null;
      void this.flush();
    }, this.writeDelayMs);
    this.timer.unref();
  }

  private async write(dirty: string[], removed: string[]): Promise<void> {
    for (const traceId of removed) {
      await unlink(join(this.dir, `${traceId}.json`)).catch(() => {});
    }
    for (const traceId of dirty) {
      const trace = this.traces.get(traceId);
      if (!trace) continue;
      const file: TraceFile = { traceId, updatedAt: trace.updatedAt, order: trace.updated, spans: [...trace.spans.values()] };
      const path = join(this.dir, `${traceId}.json`);
      const temporary = `${path}.${process.pid}.tmp`;
      try {
        mkdirSync(this.dir, { recursive: true });
        await writeFile(temporary, JSON.stringify(file));
        await rename(temporary, path);
      } catch (error) {
        console.warn(`collector: could not write ${path}: ${(error as Error).message}`);
      }
    }
  }

  private prune(): void {
    for (const traceId of this.traces.keys()) {
      if (this.traces.size <= this.maxTraces) break;
      this.traces.delete(traceId);
      this.dirty.delete(traceId);
      this.removed.add(traceId);
    }
  }

  private summary(trace: StoredTrace): TraceSummary {
    if (trace.summary) return trace.summary;
    let start: bigint | null = null;
    let end: bigint | null = null;
    let root: SpanRecord | null = null;
    let errorCount = 0;
    let fanout: TraceSummary["fanout"] = null;
    const services = new Set<string>();
    for (const span of sortedSpans(trace)) {
      const spanStart = BigInt(span.startTimeUnixNano);
      const spanEnd = BigInt(span.endTimeUnixNano);
      if (start === null || spanStart < start) start = spanStart;
      if (end === null || spanEnd > end) end = spanEnd;
      if (!root && (span.parentSpanId === null || !trace.spans.has(span.parentSpanId))) root = span;
      if (span.status.code === 2) errorCount++;
      services.add(span.service);
      const recipients = span.attributes["messaging.batch.message_count"];
      if (!fanout && typeof recipients === "number") fanout = { recipients, sampled: null };
      const sampled = span.attributes["guildwire.fanout.sampled_recipients"];
      if (fanout && typeof sampled === "number") fanout.sampled = (fanout.sampled ?? 0) + sampled;
    }
    const first = root ?? sortedSpans(trace)[0];
    trace.summary = {
      traceId: trace.traceId,
      rootName: first?.name ?? "",
      rootService: first?.service ?? "",
      services: [...services].sort(),
      spanCount: trace.spans.size,
      errorCount,
      startTime: isoTime(start ?? 0n),
      startTimeUnixNano: (start ?? 0n).toString(),
      durationMs: start !== null && end !== null ? nsToMs(end - start) : 0,
      fanout,
    };
    return trace.summary;
  }
}

/** A span read back from disk has the shape `add` stored (files may have been edited or cut short). */
function isSpanRecord(value: unknown): value is SpanRecord {
  if (typeof value !== "object" || value === null) return false;
  const span = value as Record<string, unknown>;
  const isObject = (v: unknown): boolean => typeof v === "object" && v !== null && !Array.isArray(v);
  return (
    typeof span.traceId === "string" &&
    typeof span.spanId === "string" &&
    /^[0-9a-f]{16}$/.test(span.spanId) &&
    (span.parentSpanId === null || (typeof span.parentSpanId === "string" && /^[0-9a-f]{16}$/.test(span.parentSpanId))) &&
    typeof span.name === "string" &&
    typeof span.kind === "number" &&
    typeof span.service === "string" &&
    typeof span.startTimeUnixNano === "string" &&
    /^\d{1,20}$/.test(span.startTimeUnixNano) &&
    typeof span.endTimeUnixNano === "string" &&
    /^\d{1,20}$/.test(span.endTimeUnixNano) &&
    isObject(span.attributes) &&
    isObject(span.status) &&
    typeof (span.status as { code?: unknown }).code === "number" &&
    Array.isArray(span.events) &&
    Array.isArray(span.links) &&
    isObject(span.resource) &&
    isObject(span.scope)
  );
}

function sortedSpans(trace: StoredTrace): SpanRecord[] {
  return [...trace.spans.values()].sort((a, b) => {
    const byStart = BigInt(a.startTimeUnixNano) - BigInt(b.startTimeUnixNano);
    return byStart > 0n ? 1 : byStart < 0n ? -1 : 0;
  });
}
