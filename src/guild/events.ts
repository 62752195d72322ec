import type { Message } from "../gateway/protocol.ts";
import type { SpanRecord } from "../telemetry/index.ts";
import type { Incoming } from "../transport/index.ts";

/** What a guild fans out. `seq` orders a guild's events; sessions use it to drop repeats and find gaps. */
export interface MessageCreateEvent {
  type: "MESSAGE_CREATE";
  seq: number;
  /**
   * The message as JSON text, serialized once by the guild: a string crosses RPC as one copy
   * and goes into each session's frame as it is, where an object would be cloned and
   * stringified again for every recipient.
   */
  data: string;
}
export type GuildEvent = MessageCreateEvent;

/** A message's content: 1–4000 characters, counted as Unicode code points (an emoji is one). */
export const MAX_CONTENT_LENGTH = 4000;
export const CONTENT_RULE = `content must be a string of 1–${MAX_CONTENT_LENGTH} characters, with no unpaired surrogates`;

/**
 * Content the guild can store as given: an unpaired surrogate would be stored as U+FFFD, so
 * history, gap fills and resends would differ from what the poster and live sessions saw.
 */
export function isValidContent(content: unknown): content is string {
  if (typeof content !== "string" || content.length === 0 || !content.isWellFormed()) return false;
  if (content.length <= MAX_CONTENT_LENGTH) return true; // UTF-16 units never undercount code points
  if (content.length > 2 * MAX_CONTENT_LENGTH) return false;
  let codePoints = 0;
  for (const _ of content) if (++codePoints > MAX_CONTENT_LENGTH) return false;
  return true;
}

export const messageCreateEvent = (message: Message): MessageCreateEvent => ({
  type: "MESSAGE_CREATE",
  seq: message.seq,
  data: JSON.stringify(message),
});

/** One RPC to one session: every event queued for it, in seq order, each wrapped when sampled. */
export interface GuildDelivery {
  guildId: string;
  events: Incoming<GuildEvent>[];
  /**
   * The caller exports the delivery's spans: the session hands them back in its result instead
   * of sending a request of its own. Callers of older versions leave it unset, and their
   * sessions export as before.
   */
  returnSpans?: boolean;
}

/** A delivery's answer: the spans it recorded, when the caller asked for them and there are any. */
export interface DeliveryResult {
  spans?: SpanRecord[];
  /** The session has ended (or never started): stop delivering to it. */
  gone?: true;
}

/** Errors cross Durable Object boundaries as values, shaped for the HTTP API. */
export interface GuildError {
  status: 400 | 403 | 404 | 422 | 429;
  code: string;
  message: string;
  /** With 429: seconds until a retry can succeed. */
  retryAfterSeconds?: number;
}
export type GuildResult<T> = { ok: true; value: T } | { ok: false; error: GuildError };

export const ok = <T>(value: T): GuildResult<T> => ({ ok: true, value });
export const fail = <T = never>(status: GuildError["status"], code: string, message: string, retryAfterSeconds?: number): GuildResult<T> => ({
  ok: false,
  error: retryAfterSeconds === undefined ? { status, code, message } : { status, code, message, retryAfterSeconds },
});

export interface Subscription {
  sessionId: string;
  userId: string;
  /** Id (hex) of the Session object that holds the session's socket now; changes on resume. */
  target: string;
  /** Deliver every event after this seq; omitted for a new session (deliver from now on). */
  after?: number;
}
