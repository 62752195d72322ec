import { type Env, positiveIntegerVar } from "../env.ts";
import type { Session } from "../session/session.ts";
import type { SpanRecord, Telemetry } from "../telemetry/index.ts";
import { DEFAULT_FANOUT_SAMPLING, type FanoutTier, type Incoming, type TransportMode, parseFanoutTiers, parseTransportMode } from "../transport/index.ts";
import type { GuildEvent } from "./events.ts";
import { type FanoutOptions, type Recipient, RecipientGone } from "./fanout.ts";
import type { Relay } from "./relay.ts";

export type SessionStub = DurableObjectStub<Session>;
export type RelayStub = DurableObjectStub<Relay>;

/** How guilds and relays fan out, from the environment. A bad value fails loudly. */
export interface DeliveryConfig {
  transportMode: TransportMode;
  tiers: FanoutTier[];
  relayThreshold: number;
  relaySize: number;
  maxInFlight: number;
  /** Events per recipient, on average, beyond which new messages wait to be admitted. */
  maxBacklog: number;
  strategy: "coalesce" | "naive";
}

export function deliveryConfig(env: Env): DeliveryConfig {
  const strategy = env.FANOUT_STRATEGY || "coalesce";
  if (strategy !== "coalesce" && strategy !== "naive") throw new Error(`FANOUT_STRATEGY is "${strategy}"; expected coalesce or naive`);
  return {
    transportMode: parseTransportMode(env.TRANSPORT_MODE),
    tiers: fanoutTiers(env.FANOUT_SAMPLING || DEFAULT_FANOUT_SAMPLING),
    relayThreshold: positiveIntegerVar("RELAY_THRESHOLD", env.RELAY_THRESHOLD, 1000),
    relaySize: positiveIntegerVar("RELAY_SIZE", env.RELAY_SIZE, 1000),
    maxInFlight: positiveIntegerVar("FANOUT_MAX_IN_FLIGHT", env.FANOUT_MAX_IN_FLIGHT, 64),
    maxBacklog: positiveIntegerVar("FANOUT_MAX_BACKLOG", env.FANOUT_MAX_BACKLOG, 32),
    strategy,
  };
}

/** FANOUT_SAMPLING, with the setting named when it is wrong (the parser knows nothing of settings). */
function fanoutTiers(spec: string): FanoutTier[] {
  try {
    return parseFanoutTiers(spec);
  } catch (error) {
    throw new Error(`FANOUT_SAMPLING: ${error instanceof Error ? error.message : String(error)}`);
  }
}

/** What a guild's or relay's fanouts share: one owner, one config, one telemetry. */
interface FanoutOwner<Stub> {
  ctx: { waitUntil(promise: Promise<unknown>): void };
  config: DeliveryConfig;
  /** Exports the owner's spans, and those its callees hand back, once the fanout is idle. */
  telemetry: Telemetry;
  /** The fanout has nothing in flight (events may still wait out a retry's backoff). */
  idle?(): void;
}

/** Bounds from the config; spans waiting for the fanout go out when it has nothing in flight, and the owner hears of it. */
function ownerOptions<Stub>(owner: FanoutOwner<Stub>): Omit<FanoutOptions<Stub>, "send"> {
  const { ctx, config, telemetry } = owner;
  return {
    maxInFlight: config.maxInFlight,
    maxBacklog: config.maxBacklog,
    strategy: config.strategy,
    idle: () => {
      telemetry.exportPending(ctx);
      owner.idle?.();
    },
  };
}

export interface SessionFanoutOwner extends FanoutOwner<SessionStub> {
  env: Env;
  /** A session that kept failing, or `ended` (it said so), is dropped: the owner forgets it. */
  drop(recipient: Recipient<SessionStub>, ended: boolean): void;
  guildId(): string;
  onSent?(durationMs: number): void;
}

/**
 * Fanout options that deliver to Session objects (used by guilds directly and by relays): one
 * RPC carries every event queued for the session; the batch itself is bare, each event in it
 * is wrapped or not on its own. Sampled sessions hand their delivery spans back, and the owner
 * exports them together: when a full request's worth is waiting, on its next export, or once
 * the fanout has nothing left in flight.
 */
export function sessionFanoutOptions(owner: SessionFanoutOwner): FanoutOptions<SessionStub> {
  const { env, ctx, telemetry } = owner;
  return {
    ...ownerOptions(owner),
    drop: (recipient, error) => {
      const ended = error instanceof RecipientGone;
      if (!ended) console.warn(`fanout of guild ${owner.guildId()}: dropping unreachable session ${recipient.id}:`, error);
      owner.drop(recipient, ended);
    },
    send: (recipient, events: Incoming<GuildEvent>[]) => {
      recipient.stub ??= env.SESSION.get(env.SESSION.idFromString(recipient.target));
      const started = Date.now();
      return recipient.stub.deliver({ guildId: owner.guildId(), events, returnSpans: telemetry.enabled }).then((result) => {
        if (result?.gone) throw new RecipientGone(`session ${recipient.id} has ended`);
        owner.onSent?.(Date.now() - started);
        // (RPC's result type widens the records' tuples, such as HrTime, to arrays.)
        if (result?.spans) telemetry.adoptSpans(result.spans as SpanRecord[], ctx);
        telemetry.exportWhenDue(ctx, true); // spans that waited too long for the idle hook
      });
    },
  };
}

export interface RelayFanoutOwner extends FanoutOwner<RelayStub> {
  env: Pick<Env, "RELAY">;
}

/** Longest pause between two attempts to reach a relay. */
const MAX_RELAY_RETRY_DELAY_MS = 2000;

/**
 * Fanout options that deliver a guild's events to its relays: one `publish` RPC per relay
 * carries every event queued for it. The guild's spans are exported when the relays' RPCs have
 * all settled, or as one settles once they have waited too long.
 *
 * A relay is never dropped: its sessions would silently stop receiving the guild. One that
 * fails is retried for as long as it takes (its events wait, in order), and the admission bound
 * makes posters wait meanwhile instead of queueing without end.
 */
export function relayFanoutOptions(owner: RelayFanoutOwner): FanoutOptions<RelayStub> {
  const { env, ctx, telemetry } = owner;
  return {
    ...ownerOptions(owner),
    retryDelayMs: (attempt) => Math.min(50 * 4 ** (attempt - 1), MAX_RELAY_RETRY_DELAY_MS),
    send: (relay, events) => {
      relay.stub ??= env.RELAY.get(env.RELAY.idFromName(relay.target));
      // A relay may hold its answer (admission): spans that waited too long go now.
      return relay.stub.publish(events).then(
        () => telemetry.exportWhenDue(ctx, true),
        (error: unknown) => {
          console.error(`relay ${relay.target} unreachable; retrying:`, error);
          throw error;
        },
      );
    },
  };
}
