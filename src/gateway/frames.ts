import { type ClientFrame, CloseCode, KNOWN_OPS, MAX_FRAME_BYTES, Op } from "./protocol.ts";

export type FrameResult =
  | { ok: true; frame: ClientFrame }
  /** `serverOnly`: a known opcode that only the server sends (4003 before IDENTIFY, else 4001). */
  | { ok: false; code: CloseCode; reason: string; serverOnly?: boolean };

const encoder = new TextEncoder();

function byteLength(text: string): number {
  // Every UTF-16 unit is 1–3 UTF-8 bytes: skip the encode when the answer is certain.
  if (text.length > MAX_FRAME_BYTES) return text.length;
  if (text.length * 3 <= MAX_FRAME_BYTES) return text.length;
  return encoder.encode(text).byteLength;
}

const fail = (code: CloseCode, reason: string): FrameResult => ({ ok: false, code, reason });

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

/**
 * Validates one client frame before anything else looks at it: size, JSON, object shape,
 * opcode, then the payload the opcode requires.
 */
export function parseClientFrame(data: string | ArrayBuffer): FrameResult {
  if (typeof data !== "string") return fail(CloseCode.DECODE_ERROR, "binary frames are not supported");
  if (byteLength(data) > MAX_FRAME_BYTES) return fail(CloseCode.DECODE_ERROR, "frame larger than 16 KiB");
  let parsed: unknown;
  try {
    parsed = JSON.parse(data);
  } catch {
    return fail(CloseCode.DECODE_ERROR, "frame is not valid JSON");
  }
  if (!isRecord(parsed)) return fail(CloseCode.DECODE_ERROR, "frame is not a JSON object");
  const { op, d } = parsed;
  if (typeof op !== "number" || !KNOWN_OPS.has(op)) return fail(CloseCode.UNKNOWN_OPCODE, `unknown opcode ${JSON.stringify(op)}`);
  switch (op) {
    case Op.HEARTBEAT:
      if (d !== null && d !== undefined && !(Number.isSafeInteger(d) && (d as number) >= 0)) {
        return fail(CloseCode.DECODE_ERROR, "heartbeat d must be the last sequence number or null");
      }
      return { ok: true, frame: { op, d: (d as number | null | undefined) ?? null } };
    case Op.IDENTIFY:
      if (!isRecord(d) || typeof d.token !== "string") return fail(CloseCode.DECODE_ERROR, "identify d must be {token}");
      return { ok: true, frame: { op, d: { token: d.token } } };
    case Op.RESUME:
      if (!isRecord(d) || typeof d.token !== "string" || typeof d.session_id !== "string" || !Number.isSafeInteger(d.seq) || (d.seq as number) < 0) {
        return fail(CloseCode.DECODE_ERROR, "resume d must be {token, session_id, seq}");
      }
      return { ok: true, frame: { op, d: { token: d.token, session_id: d.session_id, seq: d.seq as number } } };
    default:
      return { ok: false, code: CloseCode.UNKNOWN_OPCODE, reason: `opcode ${op} is sent by the server only`, serverOnly: true };
  }
}
