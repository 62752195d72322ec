/**
 * Helpers for the end-to-end tracing tests: W3C traceparent values, and reading traces back from
 * the local collector (scripts/collector.ts) over its JSON API, as any tool would.
 */
import { randomBytes } from "node:crypto";
import type { SpanView, TraceDetail, TraceSummary } from "../../scripts/lib/trace-store.ts";
import { sleep } from "./helpers.ts";

export type { SpanView, TraceDetail, TraceSummary };

export const randomTraceId = (): string => randomBytes(16).toString("hex");
export const randomSpanId = (): string => randomBytes(8).toString("hex");

export function traceparent(traceId: string, parentSpanId: string, sampled: boolean): string {
  return `00-${traceId}-${parentSpanId}-${sampled ? "01" : "00"}`;
}

export const SERVICES = ["guildwire-api", "guildwire-guild", "guildwire-session"] as const;

export async function getTrace(collectorUrl: string, traceId: string): Promise<TraceDetail | null> {
  const response = await fetch(`${collectorUrl}/api/traces/${traceId}`);
  if (response.status === 404) {
    await response.body?.cancel();
    return null;
  }
  if (response.status !== 200) throw new Error(`GET /api/traces/${traceId} → ${response.status} ${await response.text()}`);
  return (await response.json()) as TraceDetail;
}

export async function listTraces(collectorUrl: string): Promise<TraceSummary[]> {
  const response = await fetch(`${collectorUrl}/api/traces`);
  if (response.status !== 200) throw new Error(`GET /api/traces → ${response.status} ${await response.text()}`);
  return ((await response.json()) as { traces: TraceSummary[] }).traces;
}

/** The spans of a message's fanout: api → guild.dispatch → guild.fanout → session.deliver ×n. */
export interface FanoutSpans {
  api: SpanView[];
  dispatch: SpanView[];
  fanout: SpanView[];
  deliver: SpanView[];
}

export function fanoutSpans(trace: TraceDetail): FanoutSpans {
  return {
    api: trace.spans.filter((s) => s.service === "guildwire-api"),
    dispatch: trace.spans.filter((s) => s.name === "guild.dispatch"),
    fanout: trace.spans.filter((s) => s.name === "guild.fanout"),
    deliver: trace.spans.filter((s) => s.name === "session.deliver"),
  };
}

/**
 * Waits until the collector holds a complete fanout trace with this id: the API span, the guild's
 * dispatch and fanout spans, and as many delivery spans as the fanout says it sampled. Spans come
 * in several exports (one per service and invocation), so an early look can see part of a trace.
 */
export async function waitForFanoutTrace(collectorUrl: string, traceId: string, timeoutMs = 15_000): Promise<TraceDetail> {
  const deadline = Date.now() + timeoutMs;
  let last: TraceDetail | null = null;
  while (Date.now() < deadline) {
    last = await getTrace(collectorUrl, traceId);
    if (last) {
      const spans = fanoutSpans(last);
      const sampled = spans.fanout[0]?.attributes["guildwire.fanout.sampled_recipients"];
      if (spans.api.length && spans.dispatch.length && typeof sampled === "number" && spans.deliver.length >= sampled) {
        // Give a straggler (a duplicate that should not exist) a moment to show up, then re-read.
        await sleep(300);
        return (await getTrace(collectorUrl, traceId))!;
      }
    }
    await sleep(100);
  }
  throw new Error(`trace ${traceId} did not arrive complete within ${timeoutMs} ms; have: ${JSON.stringify(last?.spans.map((s) => `${s.service}:${s.name}`))}`);
}

/** Traces holding a `guild.fanout` span for this guild (its `messaging.destination.name`). */
export async function fanoutTracesOfGuild(collectorUrl: string, guildId: string): Promise<string[]> {
  const ids: string[] = [];
  for (const summary of await listTraces(collectorUrl)) {
    if (!summary.services.includes("guildwire-guild")) continue;
    const trace = await getTrace(collectorUrl, summary.traceId);
    if (trace?.spans.some((s) => s.name === "guild.fanout" && s.attributes["messaging.destination.name"] === guildId)) ids.push(summary.traceId);
  }
  return ids;
}
