import { DurableObject } from "cloudflare:workers";
import type { Env } from "../env.ts";
import type { Message } from "../gateway/protocol.ts";
import { SpanKind } from "@opentelemetry/api";
import { type Telemetry, telemetryFor } from "../telemetry/index.ts";
import {
  DEFAULT_FANOUT_SAMPLING,
  type FanoutTier,
  type HandleOptions,
  type Incoming,
  type TransportMode,
  currentCarrier,
  fanoutSampleRate,
  handle,
  keepSampled,
  parseFanoutTiers,
  parseTransportMode,
  sampledSpanContext,
  wrap,
} from "../transport/index.ts";
import {
  type GuildDelivery,
  type GuildEvent,
  type GuildResult,
  type MessageCreateEvent,
  type Subscription,
  fail,
  ok,
} from "./events.ts";
import { Fanout, type Recipient } from "./fanout.ts";
import { Timings } from "./timings.ts";

export interface CreateMessage {
  guildId: string;
  authorId: string;
  content: string;
}

export const MAX_CONTENT_LENGTH = 4000;
export const MAX_HISTORY_LIMIT = 100;
/** Backlog replayed to a resuming session in one go; a longer gap is pulled by the session. */
const MAX_BACKLOG = 1000;
/** Messages one author may post per second, and the burst allowed on top. */
const AUTHOR_RATE_PER_SECOND = 10;
const AUTHOR_BURST = 50;
/** RPCs to sessions in flight at once per guild. */
const FANOUT_MAX_IN_FLIGHT = 64;

type SessionStub = DurableObjectStub<import("../session/session.ts").Session>;

interface MessageRow extends Record<string, SqlStorageValue> {
  seq: number;
  id: string;
  author_id: string;
  content: string;
  timestamp: string;
}

/**
 * A guild: its members, its message log (`seq` +1 per message, persisted before it is
 * acknowledged) and the live sessions it fans out to.
 */
export class Guild extends DurableObject<Env> {
  private readonly sql: SqlStorage;
  private readonly timings = new Timings();
  private readonly fanout: Fanout<SessionStub>;
  private guildId: string | null;
  private lastSeq: number;
  private readonly authorBuckets = new Map<string, { tokens: number; at: number }>();
  private readonly telemetry: Telemetry;
  private readonly traced: HandleOptions;
  private readonly transportMode: TransportMode;
  private readonly fanoutTiers: FanoutTier[];

  constructor(ctx: DurableObjectState, env: Env) {
    super(ctx, env);
    // A bad TRANSPORT_MODE or FANOUT_SAMPLING fails loudly here rather than tracing wrongly.
    this.transportMode = parseTransportMode(env.TRANSPORT_MODE);
    this.fanoutTiers = parseFanoutTiers(env.FANOUT_SAMPLING || DEFAULT_FANOUT_SAMPLING);
    this.telemetry = telemetryFor("guildwire-guild", env);
    this.traced = this.telemetry.handleOptions((promise) => ctx.waitUntil(promise));
    this.sql = ctx.storage.sql;
    this.sql.exec(`
      CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
      CREATE TABLE IF NOT EXISTS members (user_id TEXT PRIMARY KEY, added_at INTEGER NOT NULL);
      CREATE TABLE IF NOT EXISTS messages (
        seq INTEGER PRIMARY KEY, id TEXT NOT NULL, author_id TEXT NOT NULL, content TEXT NOT NULL, timestamp TEXT NOT NULL
      );
      CREATE TABLE IF NOT EXISTS subscriptions (session_id TEXT PRIMARY KEY, user_id TEXT NOT NULL, target TEXT NOT NULL);
    `);
    this.guildId = (this.sql.exec<{ value: string }>("SELECT value FROM meta WHERE key = 'guild_id'").toArray()[0]?.value) ?? null;
    this.lastSeq = this.sql.exec<{ seq: number | null }>("SELECT MAX(seq) AS seq FROM messages").one().seq ?? 0;
    this.fanout = new Fanout<SessionStub>({
      maxInFlight: FANOUT_MAX_IN_FLIGHT,
      send: (recipient, events) => this.deliver(recipient, events),
      drop: (recipient, error) => {
        console.warn(`guild ${this.guildId}: dropping unreachable session ${recipient.sessionId}:`, error);
        this.sql.exec("DELETE FROM subscriptions WHERE session_id = ?", recipient.sessionId);
      },
    });
    // Subscriptions outlive eviction. What was queued in memory is not replayed here: a
    // session that sees a gap in `seq` pulls the missing events itself (`eventsAfter`).
    for (const row of this.sql.exec<{ session_id: string; user_id: string; target: string }>("SELECT * FROM subscriptions")) {
      this.fanout.add(row.session_id, row.user_id, row.target);
    }
  }

  // ---- membership -------------------------------------------------------------------------

  async addMember(guildId: string, userId: string): Promise<GuildResult<{ added: boolean }>> {
    return this.timings.time("member_add", async () => {
      this.adopt(guildId);
      const added = this.sql.exec("INSERT OR IGNORE INTO members (user_id, added_at) VALUES (?, ?)", userId, Date.now()).rowsWritten > 0;
      // Always tell the user's directory (idempotent): a previous attempt may have failed after the insert.
      await this.user(userId).addGuild(guildId);
      return ok({ added });
    });
  }

  async removeMember(guildId: string, userId: string): Promise<GuildResult<{ removed: boolean }>> {
    return this.timings.time("member_remove", async () => {
      if (!this.exists(guildId)) return fail(404, "unknown_guild", `guild ${guildId} does not exist`);
      const removed = this.sql.exec("DELETE FROM members WHERE user_id = ?", userId).rowsWritten > 0;
      // Stop deliveries before anyone is told, so no MESSAGE_CREATE follows GUILD_DELETE.
      for (const recipient of this.fanout.recipientsOf(userId)) this.forget(recipient.sessionId);
      await this.user(userId).removeGuild(guildId);
      return ok({ removed });
    });
  }

  // ---- messages ---------------------------------------------------------------------------

  async createMessage(incoming: Incoming<CreateMessage>): Promise<GuildResult<Message>> {
    return handle(incoming, "guild.dispatch", ({ guildId, authorId, content }) =>
      this.timings.time("message_create", () => {
        const denied = this.checkMember(guildId, authorId);
        if (denied) return denied;
        if (typeof content !== "string" || content.length < 1 || content.length > MAX_CONTENT_LENGTH) {
          return fail<Message>(400, "invalid_content", `content must be 1–${MAX_CONTENT_LENGTH} characters`);
        }
        if (!this.takeToken(authorId)) return fail<Message>(429, "rate_limited", "too many messages; slow down");
        const message: Message = {
          id: crypto.randomUUID(),
          guild_id: guildId,
          author_id: authorId,
          content,
          seq: this.lastSeq + 1,
          timestamp: new Date().toISOString(),
        };
        this.sql.exec(
          "INSERT INTO messages (seq, id, author_id, content, timestamp) VALUES (?, ?, ?, ?, ?)",
          message.seq,
          message.id,
          message.author_id,
          message.content,
          message.timestamp,
        );
        this.lastSeq = message.seq;
        this.publish({ type: "MESSAGE_CREATE", seq: message.seq, message });
        return ok(message);
      }),
      this.traced,
    );
  }

  async history(guildId: string, userId: string, after: number, limit: number): Promise<GuildResult<Message[]>> {
    return this.timings.time("history", () => {
      const denied = this.checkMember(guildId, userId);
      if (denied) return denied;
      return ok(this.messagesAfter(after, Math.min(limit, MAX_HISTORY_LIMIT)));
    });
  }

  async timingsFor(guildId: string): Promise<GuildResult<ReturnType<Timings["snapshot"]>>> {
    if (!this.exists(guildId)) return fail(404, "unknown_guild", `guild ${guildId} does not exist`);
    return ok(this.timings.snapshot());
  }

  // ---- sessions ---------------------------------------------------------------------------

  /**
   * Starts (or, on resume, moves) deliveries to a session. Returns the guild's current seq:
   * a new session receives everything after it; a resuming one also gets what it missed.
   */
  async subscribe(subscription: Subscription): Promise<GuildResult<{ lastSeq: number }>> {
    return this.timings.time("subscribe", () => {
      const { sessionId, userId, target, after } = subscription;
      if (!this.guildId || !this.isMember(userId)) return fail(403, "not_a_member", "not a member of this guild");
      this.sql.exec(
        "INSERT INTO subscriptions (session_id, user_id, target) VALUES (?, ?, ?) ON CONFLICT (session_id) DO UPDATE SET target = excluded.target",
        sessionId,
        userId,
        target,
      );
      const backlog = after === undefined ? [] : this.messagesAfter(after, MAX_BACKLOG).map(toEvent);
      this.fanout.add(sessionId, userId, target, backlog);
      return ok({ lastSeq: this.lastSeq });
    });
  }

  async unsubscribe(sessionId: string): Promise<void> {
    await this.timings.time("unsubscribe", () => this.forget(sessionId));
  }

  /** Events after `after` (at most `limit`), for a session that found a gap. */
  async eventsAfter(sessionId: string, after: number, limit: number): Promise<GuildEvent[]> {
    if (!this.fanout.get(sessionId)) return [];
    return this.messagesAfter(after, Math.min(limit, MAX_BACKLOG)).map(toEvent);
  }

  // ---- internals --------------------------------------------------------------------------

  /**
   * Queues `event` for every subscribed session. Unsampled (the common case), every recipient
   * gets the same bare object and tracing costs one context read. Sampled, a fanout span is
   * recorded and each recipient keeps the sampled flag with the tier rate for this fanout's
   * size: the chosen ones get one shared envelope (its carrier built once), the rest get the
   * bare event and will create no spans.
   */
  private publish(event: GuildEvent): void {
    if (this.transportMode === "bare" || !sampledSpanContext()) {
      this.fanout.publish(() => event);
      return;
    }
    const recipients = this.fanout.size;
    const rate = fanoutSampleRate(recipients, this.fanoutTiers);
    this.telemetry.tracer.startActiveSpan(
      "guild.fanout",
      {
        kind: SpanKind.PRODUCER,
        attributes: {
          "messaging.system": "guildwire",
          "messaging.operation.type": "send",
          "messaging.destination.name": this.guildId!,
          "messaging.batch.message_count": recipients,
          "guildwire.fanout.sample_rate": rate,
          "guildwire.message.seq": event.seq,
        },
      },
      (span) => {
        const traceId = span.spanContext().traceId;
        const envelope = wrap(event, { carrier: currentCarrier(), recipients });
        let sampled = 0;
        this.fanout.publish((recipient) => {
          if (!keepSampled(traceId, recipient.sessionId, rate)) return event;
          sampled++;
          return envelope;
        });
        span.setAttribute("guildwire.fanout.sampled_recipients", sampled);
        span.end();
      },
    );
  }

  private deliver(recipient: Recipient<SessionStub>, events: Incoming<GuildEvent>[]): Promise<void> {
    recipient.stub ??= this.env.SESSION.get(this.env.SESSION.idFromString(recipient.target));
    // The batch itself carries no trace context: each event in it is wrapped on its own.
    const delivery: GuildDelivery = { guildId: this.guildId!, events };
    const started = Date.now();
    return recipient.stub.deliver(delivery).then(() => {
      this.timings.record("fanout_rpc", Date.now() - started);
    });
  }

  private forget(sessionId: string): void {
    this.fanout.remove(sessionId);
    this.sql.exec("DELETE FROM subscriptions WHERE session_id = ?", sessionId);
  }

  private user(userId: string) {
    return this.env.USER.get(this.env.USER.idFromName(userId));
  }

  /** Records this object's guild id the first time a member is added: that creates the guild. */
  private adopt(guildId: string): void {
    if (this.guildId) return;
    this.sql.exec("INSERT OR REPLACE INTO meta (key, value) VALUES ('guild_id', ?)", guildId);
    this.guildId = guildId;
  }

  private exists(guildId: string): boolean {
    return this.guildId === guildId;
  }

  private isMember(userId: string): boolean {
    return this.sql.exec("SELECT 1 FROM members WHERE user_id = ?", userId).toArray().length > 0;
  }

  private checkMember(guildId: string, userId: string): GuildResult<never> | null {
    if (!this.exists(guildId)) return fail(404, "unknown_guild", `guild ${guildId} does not exist`);
    if (!this.isMember(userId)) return fail(403, "not_a_member", `you are not a member of guild ${guildId}`);
    return null;
  }

  private messagesAfter(after: number, limit: number): Message[] {
    return this.sql
      .exec<MessageRow>("SELECT seq, id, author_id, content, timestamp FROM messages WHERE seq > ? ORDER BY seq LIMIT ?", after, limit)
      .toArray()
      .map((row) => ({
        id: row.id,
        guild_id: this.guildId!,
        author_id: row.author_id,
        content: row.content,
        seq: row.seq,
        timestamp: row.timestamp,
      }));
  }

  /** Token bucket per author, in memory: a restart forgives, which is fine for a rate limit. */
  private takeToken(authorId: string): boolean {
    const now = Date.now();
    const bucket = this.authorBuckets.get(authorId) ?? { tokens: AUTHOR_BURST, at: now };
    bucket.tokens = Math.min(AUTHOR_BURST, bucket.tokens + ((now - bucket.at) / 1000) * AUTHOR_RATE_PER_SECOND);
    bucket.at = now;
    if (this.authorBuckets.size > 10_000) this.authorBuckets.clear();
    this.authorBuckets.set(authorId, bucket);
    if (bucket.tokens < 1) return false;
    bucket.tokens -= 1;
    return true;
  }
}

const toEvent = (message: Message): MessageCreateEvent => ({ type: "MESSAGE_CREATE", seq: message.seq, message });
