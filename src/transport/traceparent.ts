/**
 * W3C Trace Context `traceparent` (https://www.w3.org/TR/trace-context/#traceparent-header).
 *
 * Two entry points share one validator that works on char codes in place:
 * - `isSampledTraceparent` is the hot path. It looks at the flags byte first and returns `false`
 *   for an unsampled header before validating anything else, allocating nothing.
 * - `parseTraceparent` is the strict parser, used only once a header is known to matter.
 * They agree on every input (see test/workers/traceparent.test.ts).
 */

export interface Traceparent {
  version: string;
  traceId: string;
  spanId: string;
  flags: number;
  sampled: boolean;
}

// Offsets inside a trimmed header: vv-<32 trace id>-<16 span id>-ff
const TRACE_ID_AT = 3;
const SPAN_ID_AT = 36;
const FLAGS_AT = 53;
/** Length of the four fields version 00 defines; later versions may append `-…` after it. */
const BASE_LENGTH = 55;

const DASH = 0x2d;
const SPACE = 0x20;
const TAB = 0x09;

/** Value of a lowercase hex digit, or -1. Uppercase is invalid in traceparent. */
function hexValue(code: number): number {
  if (code >= 0x30 && code <= 0x39) return code - 0x30;
  if (code >= 0x61 && code <= 0x66) return code - 0x57;
  return -1;
}

function isOptionalWhitespace(code: number): boolean {
  return code === SPACE || code === TAB;
}

/** Lowercase hex over [from, to), and (when `nonZero`) not all zeros. */
function isHexRun(header: string, from: number, to: number, nonZero: boolean): boolean {
  let any = !nonZero;
  for (let i = from; i < to; i++) {
    const value = hexValue(header.charCodeAt(i));
    if (value < 0) return false;
    if (value !== 0) any = true;
  }
  return any;
}

/**
 * Is header[start, end) a well-formed traceparent? Checks everything but the flags byte,
 * which callers read themselves.
 */
function validateShape(header: string, start: number, end: number): boolean {
  const length = end - start;
  if (length < BASE_LENGTH) return false;
  const v0 = hexValue(header.charCodeAt(start));
  const v1 = hexValue(header.charCodeAt(start + 1));
  if (v0 < 0 || v1 < 0) return false;
  const version = v0 * 16 + v1;
  if (version === 0xff) return false;
  // Version 00 has exactly four fields; a future version may append fields after a dash.
  if (version === 0 ? length !== BASE_LENGTH : length > BASE_LENGTH && header.charCodeAt(start + BASE_LENGTH) !== DASH) {
    return false;
  }
  if (
    header.charCodeAt(start + 2) !== DASH ||
    header.charCodeAt(start + SPAN_ID_AT - 1) !== DASH ||
    header.charCodeAt(start + FLAGS_AT - 1) !== DASH
  ) {
    return false;
  }
  return (
    isHexRun(header, start + TRACE_ID_AT, start + SPAN_ID_AT - 1, true) &&
    isHexRun(header, start + SPAN_ID_AT, start + FLAGS_AT - 1, true)
  );
}

function trimmedStart(header: string): number {
  let start = 0;
  while (start < header.length && isOptionalWhitespace(header.charCodeAt(start))) start++;
  return start;
}

function trimmedEnd(header: string, start: number): number {
  let end = header.length;
  while (end > start && isOptionalWhitespace(header.charCodeAt(end - 1))) end--;
  return end;
}

/** Flags byte as a number, or -1 when its two characters are not lowercase hex. */
function flagsAt(header: string, at: number): number {
  const high = hexValue(header.charCodeAt(at));
  const low = hexValue(header.charCodeAt(at + 1));
  return high < 0 || low < 0 ? -1 : high * 16 + low;
}

/**
 * Fast path: is this a valid traceparent whose sampled flag is set? An unsampled or malformed
 * header is rejected after reading at most a few characters; nothing is allocated.
 */
export function isSampledTraceparent(header: string | null | undefined): boolean {
  if (typeof header !== "string") return false;
  const start = trimmedStart(header);
  const end = trimmedEnd(header, start);
  if (end - start < BASE_LENGTH) return false;
  // The sampled bit is the low bit of the flags' second hex digit: decide on it first.
  const low = hexValue(header.charCodeAt(start + FLAGS_AT + 1));
  if (low < 0 || (low & 1) === 0) return false;
  if (hexValue(header.charCodeAt(start + FLAGS_AT)) < 0) return false;
  return validateShape(header, start, end);
}

/** Is this a valid traceparent, sampled or not? Validates in place; allocates nothing. */
export function isValidTraceparent(header: string | null | undefined): boolean {
  if (typeof header !== "string") return false;
  const start = trimmedStart(header);
  const end = trimmedEnd(header, start);
  return validateShape(header, start, end) && flagsAt(header, start + FLAGS_AT) >= 0;
}

/** Strict parser: `null` for anything the W3C spec says to ignore. */
export function parseTraceparent(header: string): Traceparent | null {
  if (typeof header !== "string") return null;
  const start = trimmedStart(header);
  const end = trimmedEnd(header, start);
  if (!validateShape(header, start, end)) return null;
  const flags = flagsAt(header, start + FLAGS_AT);
  if (flags < 0) return null;
  return {
    version: header.slice(start, start + 2),
    traceId: header.slice(start + TRACE_ID_AT, start + SPAN_ID_AT - 1),
    spanId: header.slice(start + SPAN_ID_AT, start + FLAGS_AT - 1),
    flags,
    sampled: (flags & 1) === 1,
  };
}

/** Formats a version-00 traceparent. */
export function formatTraceparent(traceId: string, spanId: string, flags: number): string {
  return `00-${traceId}-${spanId}-${flags < 16 ? "0" : ""}${flags.toString(16)}`;
}
