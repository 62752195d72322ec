import { SpanKind, type Tracer } from "@opentelemetry/api";
import {
  type FanoutTier,
  type Incoming,
  currentCarrier,
  fanoutSampleRate,
  keepSampled,
  sampledSpanContext,
  wrap,
} from "../transport/index.ts";
import type { GuildEvent } from "./events.ts";
import type { Fanout } from "./fanout.ts";

export interface PublishOptions {
  tracer: Tracer;
  tiers: readonly FanoutTier[];
  /** `guild.fanout` or `relay.fanout`. */
  spanName: string;
  guildId: string;
  /** Sessions the whole fanout reaches: sets the tier, even when this object serves a share of them (a relay). */
  recipients: number;
  /**
   * `sessions`: the fanout's recipients are sessions; each keeps the sampled flag at the tier rate.
   * `relays`: they are relays; each gets the carrier and makes the per-session choice itself.
   */
  recipientKind: "sessions" | "relays";
}

/**
 * Queues `event` for every recipient of `fanout`, from inside the operation's context. Returns
 * what `Fanout.publish` does (the naive baseline's sends, to await).
 *
 * Unsampled (the common case), every recipient gets the same bare object and tracing costs one
 * context read. Sampled, a fanout span is recorded; the carrier and its envelope are built once,
 * and a session recipient gets the envelope only if `keepSampled` chooses it at the tier rate —
 * the rest get the bare event and will create no spans.
 */
export function publishEvent<Stub>(fanout: Fanout<Stub>, event: GuildEvent, options: PublishOptions): Promise<void> | undefined {
  if (!sampledSpanContext()) return fanout.publish(() => event);
  const rate = fanoutSampleRate(options.recipients, options.tiers);
  return options.tracer.startActiveSpan(
    options.spanName,
    {
      kind: SpanKind.PRODUCER,
      attributes: {
        "messaging.system": "guildwire",
        "messaging.operation.type": "send",
        "messaging.destination.name": options.guildId,
        // Sessions this span sends to: a relay's share, or (through relays) the whole guild's.
        "messaging.batch.message_count": options.recipientKind === "sessions" ? fanout.size : options.recipients,
        "guildwire.fanout.sample_rate": rate,
        "guildwire.message.seq": event.seq,
        ...(options.recipientKind === "relays" ? { "guildwire.fanout.relays": fanout.size } : {}),
      },
    },
    (span) => {
      const envelope: Incoming<GuildEvent> = wrap(event, { carrier: currentCarrier(), recipients: options.recipients });
      let published: Promise<void> | undefined;
      if (options.recipientKind === "relays") {
        published = fanout.publish(() => envelope);
      } else {
        const traceId = span.spanContext().traceId;
        let sampled = 0;
        published = fanout.publish((recipient) => {
          if (!keepSampled(traceId, recipient.id, rate)) return event;
          sampled++;
          return envelope;
        });
        span.setAttribute("guildwire.fanout.sampled_recipients", sampled);
      }
      span.end();
      return published;
    },
  );
}
