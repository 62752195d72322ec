import { DurableObject } from "cloudflare:workers";
import { context } from "@opentelemetry/api";
import type { Env } from "../env.ts";
import { type Telemetry, telemetryFor } from "../telemetry/index.ts";
import { type Incoming, contextFromCarrier, normalize } from "../transport/index.ts";
import { FanoutCheckpoint, oldestPending, seqRange } from "./checkpoint.ts";
import { type DeliveryConfig, type SessionStub, deliveryConfig, sessionFanoutOptions } from "./delivery.ts";
import { DropNotices } from "./drop-notices.ts";
import type { GuildEvent, Subscription } from "./events.ts";
import { Fanout } from "./fanout.ts";
import { publishEvent } from "./publish.ts";

/** A session moved onto a relay, with the events the guild had queued for it but not sent. */
export interface RelayAssignment extends Subscription {
  backlog: Incoming<GuildEvent>[];
}

/** Events a relay had queued or in flight for sessions it gives up, so the next holder can send them. */
export interface Released {
  sessionId: string;
  backlog: Incoming<GuildEvent>[];
}

/**
 * A relay fans one guild's events out to its share of the guild's sessions (Discord's answer to
 * guilds too big for one process): the guild sends each event once per relay, each relay makes
 * the per-session RPCs. Same coalescing, bounds and tiered sampling as a guild's direct fanout;
 * its span is `relay.fanout` in the `guildwire-guild` service.
 */
export class Relay extends DurableObject<Env> {
  private readonly sql: SqlStorage;
  private readonly config: DeliveryConfig;
  private readonly telemetry: Telemetry;
  private readonly fanout: Fanout<SessionStub>;
  /** How far the fanout got, so a restart resends what was only queued in memory. */
  private readonly checkpoint: FanoutCheckpoint;
  /** Sessions dropped while they may be alive, to be told so they subscribe again. */
  private readonly dropNotices: DropNotices;
  private guildId = "";

  constructor(ctx: DurableObjectState, env: Env) {
    super(ctx, env);
    this.config = deliveryConfig(env);
    this.telemetry = telemetryFor("guildwire-guild", env);
    this.sql = ctx.storage.sql;
    this.sql.exec(`
      CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
      CREATE TABLE IF NOT EXISTS members (session_id TEXT PRIMARY KEY, user_id TEXT NOT NULL, target TEXT NOT NULL);
    `);
    this.guildId = this.sql.exec<{ value: string }>("SELECT value FROM meta WHERE key = 'guild_id'").toArray()[0]?.value ?? "";
    this.checkpoint = new FanoutCheckpoint(this.sql, ctx.storage);
    this.dropNotices = new DropNotices(this.sql, ctx, env.SESSION, () => this.guildId, () => this.checkpoint.arm());
    this.fanout = new Fanout<SessionStub>(
      sessionFanoutOptions({
        env,
        ctx,
        config: this.config,
        telemetry: this.telemetry,
        guildId: () => this.guildId,
        drop: (recipient, ended) => {
          this.sql.exec("DELETE FROM members WHERE session_id = ?", recipient.id);
          if (ended) {
            // The guild forgets it too (one that stays listed is dropped again by the next sync).
            this.ctx.waitUntil(this.guild().dropSession(recipient.id, recipient.target, true).catch(() => undefined));
          } else {
            // Told from here, until it answers, and the guild not at all: a guild that cannot be
            // reached now must not leave a live session unsubscribed for good, and a late
            // "forget it" could cross the session's subscribing again. Subscribing again puts it
            // back on this relay; the guild still lists it meanwhile.
            this.dropNotices.owe(recipient.target);
          }
        },
        idle: () => this.checkpoint.progress(this.fanout.drained ? undefined : null), // the alarm scans
      }),
    );
    for (const row of this.sql.exec<{ session_id: string; user_id: string; target: string }>("SELECT * FROM members")) {
      this.fanout.add(row.session_id, row.user_id, row.target);
    }
  }

  /**
   * Adds (or re-targets) sessions and removes others; returns what was still queued for the
   * removed ones. With `replace`, every session not in `add` is removed (used to resynchronise).
   */
  async assign(guildId: string, add: RelayAssignment[], remove: string[], replace = false): Promise<Released[]> {
    if (this.guildId !== guildId) {
      this.guildId = guildId;
      this.sql.exec("INSERT OR REPLACE INTO meta (key, value) VALUES ('guild_id', ?)", guildId);
    }
    const removing = replace ? [...this.fanout.all()].map((r) => r.id).filter((id) => !add.some((a) => a.sessionId === id)) : remove;
    const released: Released[] = [];
    for (const sessionId of removing) {
      const recipient = this.fanout.remove(sessionId);
      this.sql.exec("DELETE FROM members WHERE session_id = ?", sessionId);
      // In flight too: an RPC abandoned here is not retried if it fails (sessions drop repeats).
      if (recipient) released.push({ sessionId, backlog: recipient.batch.concat(recipient.queue) });
    }
    for (const { sessionId, userId, target, backlog } of add) {
      this.sql.exec(
        "INSERT INTO members (session_id, user_id, target) VALUES (?, ?, ?) ON CONFLICT (session_id) DO UPDATE SET target = excluded.target",
        sessionId,
        userId,
        target,
      );
      const existing = this.fanout.get(sessionId);
      if (existing?.target === target && backlog.length === 0) continue;
      // In flight too, as above: re-adding abandons the RPC under way.
      this.fanout.add(sessionId, userId, target, [...(existing?.batch ?? []), ...(existing?.queue ?? []), ...backlog]);
    }
    // Backlogs moved here are this relay's to deliver now: owed until handed over, even if older than what it has.
    const moved = seqRange(add.flatMap((a) => a.backlog));
    if (moved) this.checkpoint.accept(moved.first, moved.last);
    return released;
  }

  /**
   * Fans events out to this relay's sessions. Returns once they are queued, not delivered; a
   * relay that has fallen behind first waits for room, which holds back the guild in turn.
   */
  async publish(events: Incoming<GuildEvent>[]): Promise<void> {
    // After a restart, what the last instance had not handed over goes out before anything new.
    const recovery = this.checkpoint.recover(this.resend);
    if (recovery) await recovery;
    await this.fanout.admit();
    const naiveSends: (Promise<void> | undefined)[] = [];
    let first = Infinity;
    let last = 0;
    for (const incoming of events) {
      const { message: event, carrier, recipients } = normalize(incoming);
      first = Math.min(first, event.seq);
      last = Math.max(last, event.seq);
      // A version sending bare messages (TRANSPORT_MODE=bare, as during a rollback) traces nothing here, as its guilds do not.
      const parent = this.config.transportMode === "bare" ? undefined : contextFromCarrier(carrier);
      if (!parent) {
        naiveSends.push(this.fanout.publish(() => event));
        continue;
      }
      naiveSends.push(context.with(parent, () =>
        publishEvent(this.fanout, event, {
          tracer: this.telemetry.tracer,
          tiers: this.config.tiers,
          spanName: "relay.fanout",
          guildId: this.guildId,
          recipients: recipients ?? this.fanout.size,
          recipientKind: "sessions",
        }),
      ));
    }
    if (last > 0) this.checkpoint.accept(first, last);
    await Promise.all(naiveSends); // only the naive baseline has sends to await
    // This fanout's spans, and delivery spans sessions handed back since the last export: one
    // request per publish, which carries a burst already. (Leaving them for the fanout's idle
    // hook instead, as the guild does, saved ~15 requests per 200 messages but, over 14 round
    // pairs each, left tiered at 0.95× off's deliveries/s and 1.07× its CPU, against 1.00× and
    // 1.03× this way: docs/performance.md, "Pooled round pairs".)
    this.telemetry.exportPending(this.ctx);
  }

  /** Looks in on a fanout that stayed busy; after a restart, resends what it had not handed over. */
  override async alarm(): Promise<void> {
    try {
      await this.checkpoint.alarm(this.resend, () => oldestPending(this.fanout));
    } finally {
      await this.dropNotices.alarm(); // after, so the alarm it keeps for notices still owed is not unset
    }
  }

  /** The guild's events `first`..`last` again, to this relay's sessions (they drop repeats and pull what they lack before them). */
  private readonly resend = async (first: number, last: number): Promise<void> => {
    for (const event of await this.guild().eventsForRelay(first - 1, last - first + 1)) {
      if (event.seq <= last) void this.fanout.publish(() => event);
    }
  };

  async sessionCount(): Promise<number> {
    return this.fanout.size;
  }

  private guild() {
    return this.env.GUILD.get(this.env.GUILD.idFromName(this.guildId));
  }
}
