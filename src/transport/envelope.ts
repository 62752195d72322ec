import type { Context } from "@opentelemetry/api";
import { type Carrier, currentCarrier, sanitizeCarrier } from "./carrier.ts";

/**
 * The brand is a string key, not a symbol: envelopes cross Durable Object RPC by structured
 * clone, which drops symbol keys. A user's message shaped `{message, carrier}` has no brand, so
 * it is never mistaken for an envelope.
 */
export const ENVELOPE_BRAND = "__guildwire_envelope__";
const ENVELOPE_VERSION = 1;

/** A message with the trace context of the operation that sent it. */
export interface Envelope<M> {
  readonly [ENVELOPE_BRAND]: typeof ENVELOPE_VERSION;
  message: M;
  carrier?: Carrier;
  /** Fanout size the sampling decision belongs to, for receivers that fan out further. */
  recipients?: number;
}

/** What a receiver may be sent during a rolling deploy: old senders send bare messages. */
export type Incoming<M> = M | Envelope<M>;

export interface Received<M> {
  message: M;
  carrier?: Carrier;
  recipients?: number;
}

/**
 * `envelope` wraps sampled messages with their trace context; `bare` never wraps (for a rollout,
 * or to measure the envelope's cost). Receivers accept both in every mode.
 */
export type TransportMode = "envelope" | "bare";

export function parseTransportMode(value: string | undefined): TransportMode {
  if (value === undefined || value === "" || value === "envelope") return "envelope";
  if (value === "bare") return "bare";
  throw new Error(`TRANSPORT_MODE is "${value}"; expected "envelope" or "bare"`);
}

export interface WrapOptions {
  mode?: TransportMode;
  /**
   * A carrier built once for a whole fanout (`currentCarrier()`), or `null` for "this recipient
   * is not sampled". When absent, the active context decides.
   */
  carrier?: Carrier | null;
  /** Context to read the sampled span from, when not the active one. */
  context?: Context;
  recipients?: number;
}

/**
 * Wraps `message` in an envelope when the operation is sampled; otherwise returns it untouched,
 * having done nothing but read the sampled flag.
 */
export function wrap<M>(message: M, options?: WrapOptions): Incoming<M> {
  if (options?.mode === "bare" || options?.carrier === null) return message;
  const carrier = options?.carrier ?? currentCarrier(options?.context);
  if (carrier === null) return message;
  const envelope: Envelope<M> = { [ENVELOPE_BRAND]: ENVELOPE_VERSION, message, carrier };
  if (options?.recipients !== undefined) envelope.recipients = options.recipients;
  return envelope;
}

export function isEnvelope<M>(incoming: Incoming<M>): incoming is Envelope<M> {
  return (
    typeof incoming === "object" &&
    incoming !== null &&
    (incoming as Partial<Envelope<M>>)[ENVELOPE_BRAND] === ENVELOPE_VERSION
  );
}

/**
 * Accepts a bare message or an envelope. The carrier comes from another process, so it is
 * validated here, once, before anything forwards it.
 */
export function normalize<M>(incoming: Incoming<M>): Received<M> {
  if (!isEnvelope(incoming)) return { message: incoming };
  const received: Received<M> = { message: incoming.message };
  const carrier = sanitizeCarrier(incoming.carrier);
  if (carrier) received.carrier = carrier;
  const recipients = incoming.recipients;
  if (typeof recipients === "number" && Number.isSafeInteger(recipients) && recipients > 0) {
    received.recipients = recipients;
  }
  return received;
}
