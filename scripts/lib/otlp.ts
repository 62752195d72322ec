/**
 * OTLP trace requests (ExportTraceServiceRequest) in, flat span records out — for the local
 * collector. Decodes both OTLP/HTTP encodings: JSON (hex ids, int64 as strings or numbers) and
 * binary protobuf (a small hand-written wire-format reader: no dependency, no generated code).
 * Input is untrusted: anything malformed becomes an OtlpError (→ 400) or a rejected span, never
 * an exception of another kind.
 */

export type AttributeValue = string | number | boolean | null | AttributeValue[] | { [key: string]: AttributeValue };
export type Attributes = Record<string, AttributeValue>;

export interface SpanEvent {
  name: string;
  timeUnixNano: string;
  attributes: Attributes;
}

export interface SpanLink {
  traceId: string;
  spanId: string;
  attributes: Attributes;
}

/** One span as the collector stores and serves it. Times are nanoseconds since the epoch, as decimal strings. */
export interface SpanRecord {
  traceId: string;
  spanId: string;
  parentSpanId: string | null;
  name: string;
  /** OTLP SpanKind: 0 unspecified, 1 internal, 2 server, 3 client, 4 producer, 5 consumer. */
  kind: number;
  service: string;
  startTimeUnixNano: string;
  endTimeUnixNano: string;
  attributes: Attributes;
  /** OTLP status code: 0 unset, 1 ok, 2 error. */
  status: { code: number; message?: string };
  events: SpanEvent[];
  links: SpanLink[];
  resource: Attributes;
  scope: { name: string; version?: string };
}

export interface DecodedRequest {
  spans: SpanRecord[];
  rejected: number;
  /** Why spans were rejected (the first few reasons). */
  errors: string[];
}

export class OtlpError extends Error {}

/** Nesting kept in attribute values (arrays, key-value lists); deeper values become "[…]". */
const MAX_VALUE_DEPTH = 8;
/** Longest string kept in an attribute value or name. */
const MAX_STRING = 16 * 1024;
const ZERO_TRACE = "0".repeat(32);
const ZERO_SPAN = "0".repeat(16);

const clip = (value: string): string => (value.length > MAX_STRING ? `${value.slice(0, MAX_STRING)}…` : value);

// ---- JSON ----------------------------------------------------------------------------------------

type Json = unknown;
const isObject = (value: Json): value is Record<string, Json> => typeof value === "object" && value !== null && !Array.isArray(value);
const array = (value: Json): Json[] => (Array.isArray(value) ? value : []);
const text = (value: Json): string => (typeof value === "string" ? value : "");

/** An id as lowercase hex: OTLP/JSON uses hex; base64 (protobuf's JSON mapping) is accepted too. */
function jsonId(value: Json, bytes: number): string | null {
  if (typeof value !== "string" || value === "") return null;
  if (value.length === bytes * 2 && /^[0-9a-fA-F]+$/.test(value)) return value.toLowerCase();
  if (/^[A-Za-z0-9+/_-]+={0,2}$/.test(value)) {
    const decoded = Buffer.from(value, "base64");
    if (decoded.length === bytes) return decoded.toString("hex");
  }
  return null;
}

/** A fixed64/int64 from JSON: a decimal string, a number, or `{low, high}` long bits. */
function jsonNanos(value: Json): bigint | null {
  try {
    if (typeof value === "string" && /^\d{1,20}$/.test(value)) return BigInt(value);
    if (typeof value === "number" && Number.isFinite(value) && value >= 0) return BigInt(Math.round(value));
    if (isObject(value) && typeof value.low === "number" && typeof value.high === "number") {
      return (BigInt(value.high >>> 0) << 32n) | BigInt(value.low >>> 0);
    }
  } catch {
    // fall through
  }
  return null;
}

function jsonInt(value: Json): number | string | null {
  if (typeof value === "number" && Number.isFinite(value)) return value;
  if (typeof value === "string" && /^-?\d{1,20}$/.test(value)) {
    const number = Number(value);
    return Number.isSafeInteger(number) ? number : value;
  }
  return null;
}

function jsonAnyValue(value: Json, depth: number): AttributeValue {
  if (!isObject(value)) return null;
  if (depth > MAX_VALUE_DEPTH) return "[…]";
  if ("stringValue" in value) return clip(text(value.stringValue));
  if ("boolValue" in value) return value.boolValue === true || value.boolValue === "true";
  if ("intValue" in value) return jsonInt(value.intValue);
  if ("doubleValue" in value) {
    const number = typeof value.doubleValue === "number" ? value.doubleValue : Number(value.doubleValue);
    return Number.isFinite(number) ? number : String(value.doubleValue);
  }
  if ("arrayValue" in value) {
    return isObject(value.arrayValue) ? array(value.arrayValue.values).map((item) => jsonAnyValue(item, depth + 1)) : [];
  }
  if ("kvlistValue" in value) {
    return isObject(value.kvlistValue) ? jsonAttributes(value.kvlistValue.values, depth + 1) : {};
  }
  if ("bytesValue" in value) return clip(text(value.bytesValue));
  return null;
}

function jsonAttributes(list: Json, depth = 0): Attributes {
  const attributes: Attributes = {};
  for (const item of array(list)) {
    if (!isObject(item) || typeof item.key !== "string") continue;
    attributes[clip(item.key)] = jsonAnyValue(item.value, depth);
  }
  return attributes;
}

/** Decodes an OTLP/JSON ExportTraceServiceRequest. Throws OtlpError when it is not one. */
export function decodeJsonRequest(body: string): DecodedRequest {
  let parsed: Json;
  try {
    parsed = JSON.parse(body);
  } catch (error) {
    throw new OtlpError(`body is not valid JSON: ${(error as Error).message}`);
  }
  if (!isObject(parsed)) throw new OtlpError("body must be a JSON object (an OTLP ExportTraceServiceRequest)");
  const resourceSpans = parsed.resourceSpans ?? parsed.resource_spans;
  if (resourceSpans !== undefined && !Array.isArray(resourceSpans)) throw new OtlpError("resourceSpans must be an array");

  const out = new Collector();
  for (const rs of array(resourceSpans)) {
    if (!isObject(rs)) continue;
    const resource = isObject(rs.resource) ? jsonAttributes(rs.resource.attributes) : {};
    for (const ss of array(rs.scopeSpans ?? rs.scope_spans ?? rs.instrumentationLibrarySpans)) {
      if (!isObject(ss)) continue;
      const scopeJson = isObject(ss.scope) ? ss.scope : isObject(ss.instrumentationLibrary) ? ss.instrumentationLibrary : {};
      const scope = { name: text(scopeJson.name), ...(typeof scopeJson.version === "string" && scopeJson.version ? { version: scopeJson.version } : {}) };
      for (const span of array(ss.spans)) {
        if (!isObject(span)) {
          out.reject("a span is not an object");
          continue;
        }
        const status = isObject(span.status) ? span.status : {};
        out.add({
          traceId: jsonId(span.traceId, 16),
          spanId: jsonId(span.spanId, 8),
          parentSpanId: jsonId(span.parentSpanId, 8),
          name: text(span.name),
          kind: jsonKind(span.kind),
          start: jsonNanos(span.startTimeUnixNano),
          end: jsonNanos(span.endTimeUnixNano),
          attributes: jsonAttributes(span.attributes),
          status: { code: jsonStatusCode(status.code), message: text(status.message) },
          events: array(span.events).filter(isObject).map((event) => ({
            name: clip(text(event.name)),
            timeUnixNano: String(jsonNanos(event.timeUnixNano) ?? 0n),
            attributes: jsonAttributes(event.attributes),
          })),
          links: array(span.links)
            .filter(isObject)
            .map((link) => ({ traceId: jsonId(link.traceId, 16) ?? "", spanId: jsonId(link.spanId, 8) ?? "", attributes: jsonAttributes(link.attributes) })),
          resource,
          scope,
        });
      }
    }
  }
  return out.result();
}

const KINDS = ["SPAN_KIND_UNSPECIFIED", "SPAN_KIND_INTERNAL", "SPAN_KIND_SERVER", "SPAN_KIND_CLIENT", "SPAN_KIND_PRODUCER", "SPAN_KIND_CONSUMER"];
function jsonKind(value: Json): number {
  if (typeof value === "number" && Number.isInteger(value) && value >= 0 && value <= 5) return value;
  const index = typeof value === "string" ? KINDS.indexOf(value) : -1;
  return index >= 0 ? index : 0;
}

const STATUS = ["STATUS_CODE_UNSET", "STATUS_CODE_OK", "STATUS_CODE_ERROR"];
function jsonStatusCode(value: Json): number {
  if (typeof value === "number" && Number.isInteger(value) && value >= 0 && value <= 2) return value;
  const index = typeof value === "string" ? STATUS.indexOf(value) : -1;
  return index >= 0 ? index : 0;
}

// ---- shared validation ---------------------------------------------------------------------------

interface RawSpan {
  traceId: string | null;
  spanId: string | null;
  parentSpanId: string | null;
  name: string;
  kind: number;
  start: bigint | null;
  end: bigint | null;
  attributes: Attributes;
  status: { code: number; message: string };
  events: SpanEvent[];
  links: SpanLink[];
  resource: Attributes;
  scope: { name: string; version?: string };
}

class Collector {
  private readonly spans: SpanRecord[] = [];
  private rejected = 0;
  private readonly errors: string[] = [];

  reject(reason: string): void {
    this.rejected++;
    if (this.errors.length < 5 && !this.errors.includes(reason)) this.errors.push(reason);
  }

  add(raw: RawSpan): void {
    if (!raw.traceId || raw.traceId === ZERO_TRACE) return this.reject("a span has no valid traceId (32 hex digits)");
    if (!raw.spanId || raw.spanId === ZERO_SPAN) return this.reject("a span has no valid spanId (16 hex digits)");
    if (raw.start === null) return this.reject("a span has no valid startTimeUnixNano");
    const end = raw.end !== null && raw.end >= raw.start ? raw.end : raw.start;
    const service = raw.resource["service.name"];
    this.spans.push({
      traceId: raw.traceId,
      spanId: raw.spanId,
      parentSpanId: raw.parentSpanId && raw.parentSpanId !== ZERO_SPAN ? raw.parentSpanId : null,
      name: clip(raw.name) || "(unnamed)",
      kind: raw.kind,
      service: typeof service === "string" && service ? service : "unknown_service",
      startTimeUnixNano: raw.start.toString(),
      endTimeUnixNano: end.toString(),
      attributes: raw.attributes,
      status: raw.status.message ? { code: raw.status.code, message: clip(raw.status.message) } : { code: raw.status.code },
      events: raw.events,
      links: raw.links,
      resource: raw.resource,
      scope: raw.scope,
    });
  }

  result(): DecodedRequest {
    return { spans: this.spans, rejected: this.rejected, errors: this.errors };
  }
}

// ---- protobuf --------------------------------------------------------------------------------------

/** A protobuf wire-format reader over one message's bytes. */
class Reader {
  pos: number;
  private readonly buf: Uint8Array;
  private readonly start: number;
  private readonly end: number;

  constructor(buf: Uint8Array, start = 0, end = buf.length) {
    this.buf = buf;
    this.start = start;
    this.end = end;
    this.pos = start;
  }

  get done(): boolean {
    return this.pos >= this.end;
  }

  varint(): bigint {
    let result = 0n;
    for (let shift = 0n; shift < 70n; shift += 7n) {
      if (this.pos >= this.end) throw new OtlpError("protobuf: truncated varint");
      const byte = this.buf[this.pos++]!;
      result |= BigInt(byte & 0x7f) << shift;
      if ((byte & 0x80) === 0) return result & 0xffffffffffffffffn;
    }
    throw new OtlpError("protobuf: varint too long");
  }

  small(): number {
    const value = this.varint();
    if (value > 0xffffffffn) throw new OtlpError("protobuf: value out of range");
    return Number(value);
  }

  fixed64(): bigint {
    if (this.pos + 8 > this.end) throw new OtlpError("protobuf: truncated fixed64");
    const view = new DataView(this.buf.buffer, this.buf.byteOffset + this.pos, 8);
    this.pos += 8;
    return view.getBigUint64(0, true);
  }

  double(): number {
    if (this.pos + 8 > this.end) throw new OtlpError("protobuf: truncated double");
    const view = new DataView(this.buf.buffer, this.buf.byteOffset + this.pos, 8);
    this.pos += 8;
    return view.getFloat64(0, true);
  }

  /** A length-delimited field as a sub-reader. */
  sub(): Reader {
    const length = this.small();
    if (this.pos + length > this.end) throw new OtlpError("protobuf: truncated field");
    const reader = new Reader(this.buf, this.pos, this.pos + length);
    this.pos += length;
    return reader;
  }

  bytes(): Uint8Array {
    const reader = this.sub();
    return this.buf.subarray(reader.start, reader.end);
  }

  string(): string {
    return clip(new TextDecoder().decode(this.bytes()));
  }

  skip(wireType: number): void {
    switch (wireType) {
      case 0:
        this.varint();
        return;
      case 1:
        this.fixed64();
        return;
      case 2:
        this.sub();
        return;
      case 5:
        if (this.pos + 4 > this.end) throw new OtlpError("protobuf: truncated fixed32");
        this.pos += 4;
        return;
      default:
        throw new OtlpError(`protobuf: unsupported wire type ${wireType}`);
    }
  }

  /** Calls `onField(field, wireType)` for each field; the callback reads the value or returns false to skip it. */
  fields(onField: (field: number, wireType: number) => boolean): void {
    while (!this.done) {
      const tag = this.small();
      const field = tag >>> 3;
      const wireType = tag & 7;
      if (field === 0) throw new OtlpError("protobuf: field number 0");
      if (!onField(field, wireType)) this.skip(wireType);
    }
  }
}

const hex = (bytes: Uint8Array): string => Buffer.from(bytes).toString("hex");

function pbAnyValue(reader: Reader, depth: number): AttributeValue {
  let value: AttributeValue = null;
  reader.fields((field, wire) => {
    if (field === 1 && wire === 2) value = reader.string();
    else if (field === 2 && wire === 0) value = reader.varint() !== 0n;
    else if (field === 3 && wire === 0) {
      const unsigned = reader.varint();
      const signed = unsigned >= 1n << 63n ? unsigned - (1n << 64n) : unsigned;
      value = signed >= BigInt(Number.MIN_SAFE_INTEGER) && signed <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(signed) : signed.toString();
    } else if (field === 4 && wire === 1) value = reader.double();
    else if (field === 5 && wire === 2) {
      const list: AttributeValue[] = [];
      const sub = reader.sub();
      if (depth >= MAX_VALUE_DEPTH) value = "[…]";
      else {
        sub.fields((f, w) => (f === 1 && w === 2 ? (list.push(pbAnyValue(sub.sub(), depth + 1)), true) : false));
        value = list;
      }
    } else if (field === 6 && wire === 2) {
      const sub = reader.sub();
      value = depth >= MAX_VALUE_DEPTH ? "[…]" : pbKeyValueList(sub, depth + 1);
    } else if (field === 7 && wire === 2) value = Buffer.from(reader.bytes()).toString("base64");
    else return false;
    return true;
  });
  return value;
}

/** One KeyValue message, into `into`. */
function pbKeyValue(reader: Reader, into: Attributes, depth: number): void {
  let key = "";
  let value: AttributeValue = null;
  reader.fields((field, wire) => {
    if (field === 1 && wire === 2) key = reader.string();
    else if (field === 2 && wire === 2) value = pbAnyValue(reader.sub(), depth);
    else return false;
    return true;
  });
  into[key] = value;
}

function pbKeyValueList(reader: Reader, depth: number): Attributes {
  const attributes: Attributes = {};
  reader.fields((field, wire) => (field === 1 && wire === 2 ? (pbKeyValue(reader.sub(), attributes, depth), true) : false));
  return attributes;
}

function pbId(bytes: Uint8Array, length: number): string | null {
  return bytes.length === length ? hex(bytes) : null;
}

function pbSpan(reader: Reader, resource: Attributes, scope: { name: string; version?: string }): RawSpan {
  const span: RawSpan = {
    traceId: null,
    spanId: null,
    parentSpanId: null,
    name: "",
    kind: 0,
    start: null,
    end: null,
    attributes: {},
    status: { code: 0, message: "" },
    events: [],
    links: [],
    resource,
    scope,
  };
  reader.fields((field, wire) => {
    if (field === 1 && wire === 2) span.traceId = pbId(reader.bytes(), 16);
    else if (field === 2 && wire === 2) span.spanId = pbId(reader.bytes(), 8);
    else if (field === 4 && wire === 2) span.parentSpanId = pbId(reader.bytes(), 8);
    else if (field === 5 && wire === 2) span.name = reader.string();
    else if (field === 6 && wire === 0) {
      const kind = reader.small();
      span.kind = kind <= 5 ? kind : 0;
    } else if (field === 7 && wire === 1) span.start = reader.fixed64();
    else if (field === 8 && wire === 1) span.end = reader.fixed64();
    else if (field === 9 && wire === 2) pbKeyValue(reader.sub(), span.attributes, 0);
    else if (field === 11 && wire === 2) {
      const event: SpanEvent = { name: "", timeUnixNano: "0", attributes: {} };
      const sub = reader.sub();
      sub.fields((f, w) => {
        if (f === 1 && w === 1) event.timeUnixNano = sub.fixed64().toString();
        else if (f === 2 && w === 2) event.name = sub.string();
        else if (f === 3 && w === 2) pbKeyValue(sub.sub(), event.attributes, 0);
        else return false;
        return true;
      });
      span.events.push(event);
    } else if (field === 13 && wire === 2) {
      const link: SpanLink = { traceId: "", spanId: "", attributes: {} };
      const sub = reader.sub();
      sub.fields((f, w) => {
        if (f === 1 && w === 2) link.traceId = pbId(sub.bytes(), 16) ?? "";
        else if (f === 2 && w === 2) link.spanId = pbId(sub.bytes(), 8) ?? "";
        else if (f === 4 && w === 2) pbKeyValue(sub.sub(), link.attributes, 0);
        else return false;
        return true;
      });
      span.links.push(link);
    } else if (field === 15 && wire === 2) {
      const sub = reader.sub();
      sub.fields((f, w) => {
        if (f === 2 && w === 2) span.status.message = sub.string();
        else if (f === 3 && w === 0) {
          const code = sub.small();
          span.status.code = code <= 2 ? code : 0;
        } else return false;
        return true;
      });
    } else return false;
    return true;
  });
  return span;
}

/** Decodes a binary protobuf ExportTraceServiceRequest. Throws OtlpError when it is malformed. */
export function decodeProtobufRequest(body: Uint8Array): DecodedRequest {
  const out = new Collector();
  const request = new Reader(body);
  request.fields((field, wire) => {
    if (field !== 1 || wire !== 2) return false;
    const rs = request.sub();
    // Resource and scope may come after the spans on the wire: read them first, spans second.
    let resource: Attributes = {};
    const scopeReaders: Reader[] = [];
    rs.fields((f, w) => {
      if (f === 1 && w === 2) {
        const sub = rs.sub();
        resource = {};
        sub.fields((rf, rw) => (rf === 1 && rw === 2 ? (pbKeyValue(sub.sub(), resource, 0), true) : false));
      } else if (f === 2 && w === 2) scopeReaders.push(rs.sub());
      else return false;
      return true;
    });
    for (const ss of scopeReaders) {
      const scope: { name: string; version?: string } = { name: "" };
      const spanReaders: Reader[] = [];
      ss.fields((f, w) => {
        if (f === 1 && w === 2) {
          const sub = ss.sub();
          sub.fields((sf, sw) => {
            if (sf === 1 && sw === 2) scope.name = sub.string();
            else if (sf === 2 && sw === 2) {
              const version = sub.string();
              if (version) scope.version = version;
            } else return false;
            return true;
          });
        } else if (f === 2 && w === 2) spanReaders.push(ss.sub());
        else return false;
        return true;
      });
      for (const spanReader of spanReaders) out.add(pbSpan(spanReader, resource, scope));
    }
    return true;
  });
  return out.result();
}

/** Encodes an ExportTraceServiceResponse (only partial_success, when something was rejected). */
export function encodeProtobufResponse(rejected: number, errorMessage: string): Uint8Array {
  if (rejected === 0) return new Uint8Array(0);
  const varint = (value: number): number[] => {
    const bytes: number[] = [];
    let rest = value;
    while (rest >= 0x80) {
      bytes.push((rest & 0x7f) | 0x80);
      rest = Math.floor(rest / 128);
    }
    bytes.push(rest);
    return bytes;
  };
  const message = new TextEncoder().encode(errorMessage);
  const partial = [0x08, ...varint(rejected), 0x12, ...varint(message.length), ...message];
  return new Uint8Array([0x0a, ...varint(partial.length), ...partial]);
}
