/** The gateway protocol of CONTRACT.md, shared by the session object and Node clients. */

export const Op = {
  DISPATCH: 0,
  HEARTBEAT: 1,
  IDENTIFY: 2,
  RESUME: 6,
  RECONNECT: 7,
  INVALID_SESSION: 9,
  HELLO: 10,
  HEARTBEAT_ACK: 11,
} as const;
export type Op = (typeof Op)[keyof typeof Op];

/** Opcodes a client may send. Every other known opcode is server → client only. */
export const CLIENT_OPS: ReadonlySet<number> = new Set([Op.HEARTBEAT, Op.IDENTIFY, Op.RESUME]);
export const KNOWN_OPS: ReadonlySet<number> = new Set(Object.values(Op));

export const CloseCode = {
  NORMAL: 1000,
  GOING_AWAY: 1001,
  UNKNOWN_ERROR: 4000,
  UNKNOWN_OPCODE: 4001,
  DECODE_ERROR: 4002,
  NOT_AUTHENTICATED: 4003,
  AUTHENTICATION_FAILED: 4004,
  ALREADY_AUTHENTICATED: 4005,
  INVALID_SEQ: 4007,
  RATE_LIMITED: 4008,
  SESSION_TIMED_OUT: 4009,
} as const;
export type CloseCode = (typeof CloseCode)[keyof typeof CloseCode];

/** Frames larger than this (in UTF-8 bytes) are closed with 4002. */
export const MAX_FRAME_BYTES = 16 * 1024;
/** Client frames allowed per window before close 4008 (Discord allows 120 per minute). */
export const RATE_LIMIT_FRAMES = 120;
export const RATE_LIMIT_WINDOW_MS = 60_000;
export const DEFAULT_HEARTBEAT_INTERVAL_MS = 41_250;
/** A session that misses its heartbeat by this factor of the interval is closed with 4009. */
export const HEARTBEAT_TIMEOUT_FACTOR = 1.5;
/** How long a dropped session stays resumable, and how much it buffers for that. */
export const RESUME_WINDOW_MS = 60_000;
export const RESUME_BUFFER_MIN_DISPATCHES = 1_000;

export type EventName = "READY" | "RESUMED" | "MESSAGE_CREATE" | "GUILD_CREATE" | "GUILD_DELETE";

/** A stored message, as the HTTP API returns it and MESSAGE_CREATE carries it. */
export interface Message {
  id: string;
  guild_id: string;
  author_id: string;
  content: string;
  seq: number;
  timestamp: string;
}

export interface ReadyData {
  session_id: string;
  user_id: string;
  guilds: string[];
}

export type ServerFrame =
  | { op: typeof Op.DISPATCH; t: EventName; s: number; d: unknown }
  | { op: typeof Op.HELLO; d: { heartbeat_interval: number } }
  | { op: typeof Op.HEARTBEAT_ACK; d: null }
  | { op: typeof Op.HEARTBEAT; d: number | null }
  | { op: typeof Op.RECONNECT; d: null }
  | { op: typeof Op.INVALID_SESSION; d: boolean };

export type ClientFrame =
  | { op: typeof Op.HEARTBEAT; d: number | null }
  | { op: typeof Op.IDENTIFY; d: { token: string } }
  | { op: typeof Op.RESUME; d: { token: string; session_id: string; seq: number } };
