import { type Attributes, type HrTime, type SpanContext, type SpanKind, type SpanStatus, createTraceState } from "@opentelemetry/api";
import type { InstrumentationScope } from "@opentelemetry/core";
import { type Resource, resourceFromAttributes } from "@opentelemetry/resources";
import type { ReadableSpan, TimedEvent } from "@opentelemetry/sdk-trace-base";

/** A span context as plain data: the trace state travels as its header value. */
interface ContextRecord {
  traceId: string;
  spanId: string;
  traceFlags: number;
  traceState?: string;
}

/**
 * An ended span as plain data, so it can travel in a Durable Object RPC result (a span object
 * has methods and cannot be cloned). A session hands its delivery spans back to the guild or
 * relay that called it, which exports many sessions' spans in one request.
 */
export interface SpanRecord {
  name: string;
  kind: SpanKind;
  context: ContextRecord;
  parent?: ContextRecord;
  startTime: HrTime;
  endTime: HrTime;
  duration: HrTime;
  status: SpanStatus;
  attributes: Attributes;
  links: { context: ContextRecord; attributes?: Attributes; droppedAttributesCount?: number }[];
  events: TimedEvent[];
  scope: InstrumentationScope;
  resource: Attributes;
  dropped: [attributes: number, events: number, links: number];
}

function contextRecord(context: SpanContext): ContextRecord {
  const { traceId, spanId, traceFlags, traceState } = context;
  return traceState ? { traceId, spanId, traceFlags, traceState: traceState.serialize() } : { traceId, spanId, traceFlags };
}

function spanContext(record: ContextRecord): SpanContext {
  const { traceId, spanId, traceFlags, traceState } = record;
  return traceState ? { traceId, spanId, traceFlags, traceState: createTraceState(traceState) } : { traceId, spanId, traceFlags };
}

export function toSpanRecord(span: ReadableSpan): SpanRecord {
  return {
    name: span.name,
    kind: span.kind,
    context: contextRecord(span.spanContext()),
    ...(span.parentSpanContext ? { parent: contextRecord(span.parentSpanContext) } : {}),
    startTime: span.startTime,
    endTime: span.endTime,
    duration: span.duration,
    status: span.status,
    attributes: span.attributes,
    links: span.links.map((link) => ({ ...link, context: contextRecord(link.context) })),
    events: span.events,
    scope: span.instrumentationScope,
    resource: span.resource.attributes as Attributes,
    dropped: [span.droppedAttributesCount, span.droppedEventsCount, span.droppedLinksCount],
  };
}

/**
 * One Resource per distinct set of attributes: OTLP serializers group spans by the resource
 * object, so spans of one service must share it to be sent under one resource.
 */
const resources = new Map<string, Resource>();
function sharedResource(attributes: Attributes): Resource {
  const key = JSON.stringify(attributes);
  let resource = resources.get(key);
  if (!resource) {
    if (resources.size >= 64) resources.clear(); // a handful of services; never grows unbounded
    resource = resourceFromAttributes(attributes);
    resources.set(key, resource);
  }
  return resource;
}

export function fromSpanRecord(record: SpanRecord): ReadableSpan {
  const context = spanContext(record.context);
  return {
    name: record.name,
    kind: record.kind,
    spanContext: () => context,
    ...(record.parent ? { parentSpanContext: spanContext(record.parent) } : {}),
    startTime: record.startTime,
    endTime: record.endTime,
    duration: record.duration,
    status: record.status,
    attributes: record.attributes,
    links: record.links.map((link) => ({ ...link, context: spanContext(link.context) })),
    events: record.events,
    ended: true,
    resource: sharedResource(record.resource),
    instrumentationScope: record.scope,
    droppedAttributesCount: record.dropped[0],
    droppedEventsCount: record.dropped[1],
    droppedLinksCount: record.dropped[2],
  };
}
