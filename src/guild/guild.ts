import { DurableObject } from "cloudflare:workers";
import { type Env, positiveIntegerVar } from "../env.ts";
import type { Message } from "../gateway/protocol.ts";
import { type Telemetry, telemetryFor } from "../telemetry/index.ts";
import { type HandleOptions, type Incoming, handle, normalize } from "../transport/index.ts";
import { FanoutCheckpoint, type OldestPending, oldestPending, seqRange } from "./checkpoint.ts";
import { type DeliveryConfig, type RelayStub, type SessionStub, deliveryConfig, relayFanoutOptions, sessionFanoutOptions } from "./delivery.ts";
import { CONTENT_RULE, type GuildEvent, type GuildResult, type Subscription, fail, isValidContent, messageCreateEvent, ok } from "./events.ts";
import { DropNotices } from "./drop-notices.ts";
import { Fanout } from "./fanout.ts";
import { publishEvent } from "./publish.ts";
import type { RelayAssignment, Released } from "./relay.ts";
import { Timings } from "./timings.ts";

export interface CreateMessage {
  guildId: string;
  authorId: string;
  content: string;
  /** The client's `Idempotency-Key`: a retry with the same key gets the message the first made. */
  idempotencyKey?: string;
}

export const MAX_HISTORY_LIMIT = 100;
/** Events a session may pull in one go to fill a gap; a longer gap takes several pulls. */
const MAX_PULL = 1000;
/**
 * Messages a guild keeps (MESSAGE_RETENTION): its log is its history and what sessions pull to
 * fill gaps, and an object's storage is capped (10 GB on Cloudflare), so the oldest are pruned.
 */
export function messageRetention(env: Pick<Env, "MESSAGE_RETENTION">): number {
  return positiveIntegerVar("MESSAGE_RETENTION", env.MESSAGE_RETENTION, 100_000);
}
/** Pruning runs once per this many messages (or per retention, if fewer): a range delete, not one per post. */
const PRUNE_EVERY = 1000;
/** Most messages one prune deletes, so a log far over retention (a lowered setting) is worked off over several. */
const PRUNE_AT_MOST = 10_000;
/** How long a removed member's sessions may still pull what was posted before the removal. */
const DEPARTURE_KEPT_MS = 5 * 60_000;
/**
 * Posts that may wait to be published at once (for admission, or behind a removal, relay sync or
 * recovery). Beyond it a post is refused (429) rather than held: each holds its content in
 * memory, and a fanout stuck behind a relay that is down would otherwise gather them until the
 * object runs out of memory.
 */
const MAX_WAITING_POSTS = 1000;
/** Where a post with an idempotency key is found while on its way: keys are per author. */
function idempotencyKeyOf({ authorId, idempotencyKey }: Pick<CreateMessage, "authorId" | "idempotencyKey">): string {
  return `${authorId}\n${idempotencyKey}`;
}
/** Messages one author may post per second, and the burst allowed on top. */
const AUTHOR_RATE_PER_SECOND = 10;
const AUTHOR_BURST = 50;
/** Authors whose buckets are kept in memory at most. */
const MAX_AUTHOR_BUCKETS = 10_000;

function refilled(bucket: { tokens: number; at: number }, now: number): number {
  return Math.min(AUTHOR_BURST, bucket.tokens + ((now - bucket.at) / 1000) * AUTHOR_RATE_PER_SECOND);
}

interface MessageRow extends Record<string, SqlStorageValue> {
  seq: number;
  id: string;
  author_id: string;
  content: string;
  timestamp: string;
}

interface Subscriber {
  userId: string;
  target: string;
}

/**
 * A guild: its members, its message log (`seq` +1 per message, persisted before it is
 * acknowledged) and the live sessions it fans out to — directly while it is small, through
 * relays once it has `RELAY_THRESHOLD` live sessions.
 */
export class Guild extends DurableObject<Env> {
  private readonly sql: SqlStorage;
  private readonly config: DeliveryConfig;
  private readonly telemetry: Telemetry;
  private readonly traced: HandleOptions;
  private readonly timings = new Timings();
  private readonly authorBuckets = new Map<string, { tokens: number; at: number }>();
  private guildId: string | null;
  private lastSeq: number;
  private readonly retention: number;
  /** Posts past the checks but not yet stored: waiting to be ready to publish, or for admission. */
  private waitingPosts = 0;
  /** Every live session subscribed here (mirrors the `subscriptions` table). */
  private readonly subscribers = new Map<string, Subscriber>();
  /** Direct delivery to sessions, while there are no relays. */
  private readonly sessions: Fanout<SessionStub>;
  /** Delivery to relays, each serving the sessions `relayOf` maps to it. */
  private readonly relays: Fanout<RelayStub>;
  private relayCount: number;
  /** After a restart in relay mode, or a failed assignment, relays are resynchronised before the next event. */
  private relaysSynced = false;
  /** Relay syncs under way: backlogs may be travelling in their assignments. */
  private syncing = 0;
  /** How far the fanout got, so a restart resends what was only queued in memory (made on first use: it has a table). */
  private get checkpoint(): FanoutCheckpoint {
    return (this.checkpointStore ??= new FanoutCheckpoint(this.sql, this.ctx.storage));
  }
  private checkpointStore: FanoutCheckpoint | undefined;
  /** Sessions dropped while they may be alive, to be told so they subscribe again (made on first use). */
  private get dropNotices(): DropNotices {
    return (this.dropNoticeStore ??= new DropNotices(this.sql, this.ctx, this.env.SESSION, () => this.guildId!, () => this.checkpoint.arm()));
  }
  private dropNoticeStore: DropNotices | undefined;

  constructor(ctx: DurableObjectState, env: Env) {
    super(ctx, env);
    // A bad TRANSPORT_MODE, FANOUT_SAMPLING or relay setting fails loudly here.
    this.config = deliveryConfig(env);
    this.retention = messageRetention(env);
    this.telemetry = telemetryFor("guildwire-guild", env);
    this.traced = this.telemetry.handleOptions;
    this.sql = ctx.storage.sql;
    // A guild exists once its first member is added. Until then nothing is stored, so requests
    // for made-up guild ids (answered 404 or 403) leave no storage behind.
    const created = this.sql.exec("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").toArray().length > 0;
    if (created) this.createTables();
    this.guildId = created ? this.meta("guild_id") : null;
    this.relayCount = created ? Number(this.meta("relay_count") ?? 0) : 0;
    this.lastSeq = created ? (this.sql.exec<{ seq: number | null }>("SELECT MAX(seq) AS seq FROM messages").one().seq ?? 0) : 0;
    this.sessions = new Fanout<SessionStub>(
      sessionFanoutOptions({
        env,
        ctx,
        config: this.config,
        telemetry: this.telemetry,
        guildId: () => this.guildId!,
        drop: (recipient, ended) =>
          void this.dropSession(recipient.id, recipient.target, ended).catch((error: unknown) => console.error(`guild ${this.guildId}: dropping session ${recipient.id} failed:`, error)),
        onSent: (ms) => this.timings.record("fanout_rpc", ms),
        idle: () => this.checkpoint.progress(this.drainedOrUnknown()),
      }),
    );
    this.relays = new Fanout<RelayStub>(
      relayFanoutOptions({
        env,
        ctx,
        config: this.config,
        telemetry: this.telemetry,
        idle: () => this.checkpoint.progress(this.drainedOrUnknown()),
      }),
    );
    // Subscriptions outlive eviction. What was queued in memory is resent (the checkpoint's
    // alarm, or the next message, recovers it); a session that sees a gap in `seq` also pulls
    // the missing events itself (`eventsAfter`).
    if (created) {
      for (const row of this.sql.exec<{ session_id: string; user_id: string; target: string }>("SELECT * FROM subscriptions")) {
        this.subscribers.set(row.session_id, { userId: row.user_id, target: row.target });
        if (this.relayCount === 0) this.sessions.add(row.session_id, row.user_id, row.target);
      }
    }
    this.addRelayRecipients();
  }

  private createTables(): void {
    this.sql.exec(`
      CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
      CREATE TABLE IF NOT EXISTS members (user_id TEXT PRIMARY KEY, added_at INTEGER NOT NULL);
      CREATE TABLE IF NOT EXISTS messages (
        seq INTEGER PRIMARY KEY, id TEXT NOT NULL, author_id TEXT NOT NULL, content TEXT NOT NULL, timestamp TEXT NOT NULL,
        idempotency_key TEXT
      );
      CREATE TABLE IF NOT EXISTS subscriptions (session_id TEXT PRIMARY KEY, user_id TEXT NOT NULL, target TEXT NOT NULL);
      CREATE TABLE IF NOT EXISTS departures (user_id TEXT PRIMARY KEY, up_to INTEGER NOT NULL, at INTEGER NOT NULL);
    `);
    // Guilds made before idempotency keys get the column in place.
    if (!this.sql.exec("SELECT * FROM messages LIMIT 0").columnNames.includes("idempotency_key")) {
      this.sql.exec("ALTER TABLE messages ADD COLUMN idempotency_key TEXT");
    }
    // Only posts that carry a key are indexed: the rest pay nothing for it. Pruned with their messages.
    this.sql.exec("CREATE UNIQUE INDEX IF NOT EXISTS messages_by_idempotency_key ON messages (author_id, idempotency_key) WHERE idempotency_key IS NOT NULL");
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
      if (removed) {
        // What was posted while they were a member is still theirs: their sessions pull what had
        // not reached them yet before showing GUILD_DELETE (`eventsAfter`).
        const now = Date.now();
        this.sql.exec("DELETE FROM departures WHERE at < ?", now - DEPARTURE_KEPT_MS);
        this.sql.exec("INSERT OR REPLACE INTO departures (user_id, up_to, at) VALUES (?, ?, ?)", userId, this.lastSeq, now);
      }
      // Stop deliveries before anyone is told, so no MESSAGE_CREATE follows GUILD_DELETE: every
      // session of the user is forgotten at once (before any await, so a restart cannot leave
      // one listed), and no message goes out until their relays have let them go.
      const leaving = [...this.subscribers].filter(([, subscriber]) => subscriber.userId === userId);
      const forgotten = Promise.all(leaving.map(([sessionId]) => this.forget(sessionId)));
      this.holdPublishingUntil(forgotten);
      // A relay that could not be told is resynchronised before the next message (it marked the
      // relays for it), so the removal goes on: the user's sessions are told either way.
      await forgotten.catch((error: unknown) => console.error(`guild ${guildId}: a relay could not drop a removed member's session; resyncing:`, error));
      await this.user(userId).removeGuild(guildId);
      return ok({ removed });
    });
  }

  // ---- messages ---------------------------------------------------------------------------

  async createMessage(incoming: Incoming<CreateMessage>): Promise<GuildResult<Message>> {
    const post = normalize(incoming).message;
    const repeated = this.repeatedPost(post);
    if (repeated) return repeated;
    // Refused at once, not after waiting for admission: a busy guild keeps no one in its queue
    // to be told they are not a member, or are posting too fast.
    const refused = this.refusePost(post);
    if (refused) return refused;
    if (post.idempotencyKey === undefined) return this.publishPost(incoming);
    const key = idempotencyKeyOf(post);
    const underWay = this.publishPost(incoming).finally(() => this.postsUnderWay.delete(key));
    this.postsUnderWay.set(key, { content: post.content, result: underWay });
    return underWay;
  }

  /** Posts with an idempotency key not yet stored, so a retry that arrives meanwhile waits for the same result. */
  private readonly postsUnderWay = new Map<string, { content: string; result: Promise<GuildResult<Message>> }>();

  /**
   * A retry of a post already made with the same idempotency key (stored, or still on its way):
   * its message, without storing or fanning out another. The same key with other content is a
   * client's mistake (422, as the IETF's Idempotency-Key draft has it). Null for anything else,
   * including a retry from someone no longer a member (refused as any post of theirs would be).
   */
  private repeatedPost({ guildId, authorId, content, idempotencyKey }: CreateMessage): GuildResult<Message> | Promise<GuildResult<Message>> | null {
    if (idempotencyKey === undefined || this.checkMember(guildId, authorId)) return null;
    const reused = fail<Message>(422, "idempotency_key_reused", "this Idempotency-Key was used for a message with other content");
    const underWay = this.postsUnderWay.get(idempotencyKeyOf({ authorId, idempotencyKey }));
    if (underWay) return underWay.content === content ? underWay.result : reused;
    const row = this.sql
      .exec<MessageRow>("SELECT seq, id, author_id, content, timestamp FROM messages WHERE author_id = ? AND idempotency_key = ?", authorId, idempotencyKey)
      .toArray()[0];
    if (!row) return null;
    return row.content === content ? ok(this.messageOf(row)) : reused;
  }

  /** Waits until the post may go out (counted in `waitingPosts` meanwhile), then stores and fans it out. */
  private async publishPost(incoming: Incoming<CreateMessage>): Promise<GuildResult<Message>> {
    this.waitingPosts++;
    try {
      const ready = this.readyToPublish();
      if (ready) await ready;
      // A guild whose fanout has fallen behind makes posters wait rather than queue without bound.
      await (this.relayCount > 0 ? this.relays : this.sessions).admit();
      // Again: a relay sync may have failed while this post waited.
      const readyAgain = this.readyToPublish();
      if (readyAgain) await readyAgain;
    } finally {
      this.waitingPosts--;
    }
    let naiveSends: Promise<void> | undefined;
    try {
      const result = await handle(
        incoming,
        "guild.dispatch",
        (post) =>
          this.timings.time("message_create", () => {
            const stored = this.storeMessage(post);
            if (stored.ok) naiveSends = this.publish(messageCreateEvent(stored.value));
            return stored;
          }),
        this.traced,
      );
      await naiveSends; // the naive baseline answers once every RPC is back, as a first version would
      return result;
    } finally {
      // A failed dispatch's span (ended with its error) goes out as a successful one's would.
      this.telemetry.exportWhenDue(this.ctx, (this.relayCount > 0 ? this.relays : this.sessions).busy);
    }
  }

  /** Numbers and stores a post: the next `seq`, owed to every subscriber from here on. */
  private storeMessage({ guildId, authorId, content, idempotencyKey }: CreateMessage): GuildResult<Message> {
    const denied = this.checkMember(guildId, authorId); // removed while waiting for admission?
    if (denied) return denied;
    const message: Message = {
      id: crypto.randomUUID(),
      guild_id: guildId,
      author_id: authorId,
      content,
      seq: this.lastSeq + 1,
      timestamp: new Date().toISOString(),
    };
    this.sql.exec(
      "INSERT INTO messages (seq, id, author_id, content, timestamp, idempotency_key) VALUES (?, ?, ?, ?, ?, ?)",
      message.seq,
      message.id,
      message.author_id,
      message.content,
      message.timestamp,
      idempotencyKey ?? null,
    );
    this.lastSeq = message.seq;
    if (message.seq % Math.min(PRUNE_EVERY, this.retention) === 0) this.prune();
    this.checkpoint.accept(message.seq);
    return ok(message);
  }

  /**
   * What must happen before a new event goes out, if anything: removals under way finish (a
   * removed member's relay lets the session go first), relays learn their sessions (after a
   * restart in relay mode, or a failed sync: no event may reach a relay before it knows its
   * sessions), then what was lost is resent (after a restart or a failed sync), so it goes out
   * before anything new rather than every session pulling it at once.
   */
  private readyToPublish(): Promise<void> | undefined {
    if (this.removals) return this.removals.then(() => this.readyToPublish());
    if (this.relayCount > 0 && !this.relaysSynced) return this.syncRelays().then(() => this.checkpoint.recover(this.resend));
    return this.checkpoint.recover(this.resend);
  }

  /** Removals whose relays have not yet let the sessions go (a failed one marks relays for a sync). */
  private removals: Promise<void> | undefined;

  private holdPublishingUntil(done: Promise<unknown>): void {
    const removals: Promise<void> = Promise.all([this.removals, done])
      .then(
        () => undefined,
        () => undefined,
      )
      .finally(() => {
        if (this.removals === removals) this.removals = undefined;
      });
    this.removals = removals;
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
   * Starts (or, on resume, re-targets) deliveries to a session, and returns the guild's current
   * seq: the session receives every event after it, and pulls (`eventsAfter`) anything between
   * its own last seq and this one.
   */
  async subscribe(subscription: Subscription): Promise<GuildResult<{ lastSeq: number }>> {
    return this.timings.time("subscribe", async () => {
      const { sessionId, userId, target } = subscription;
      if (!this.guildId || !this.isMember(userId)) return fail(403, "not_a_member", "not a member of this guild");
      this.sql.exec(
        "INSERT INTO subscriptions (session_id, user_id, target) VALUES (?, ?, ?) ON CONFLICT (session_id) DO UPDATE SET target = excluded.target",
        sessionId,
        userId,
        target,
      );
      this.subscribers.set(sessionId, { userId, target });
      if (this.relayCount > 0 && this.subscribers.size > this.relayCount * this.config.relaySize) {
        await this.useRelays(this.relayCount * 2);
      } else if (this.relayCount > 0) {
        await this.assign(this.relayOf(sessionId), [{ sessionId, userId, target, backlog: [] }], []);
      } else if (this.subscribers.size >= this.config.relayThreshold) {
        await this.useRelays(Math.ceil(this.subscribers.size / this.config.relaySize) + 1);
      } else {
        this.sessions.add(sessionId, userId, target);
      }
      return ok({ lastSeq: this.lastSeq });
    });
  }

  async unsubscribe(sessionId: string): Promise<void> {
    await this.timings.time("unsubscribe", () => this.forget(sessionId));
  }

  /**
   * Deliveries to a session kept failing, or it answered that it has ended (here or on its
   * relay): forget it. One that may still be alive is told, so it can subscribe again.
   */
  async dropSession(sessionId: string, target: string, ended: boolean): Promise<void> {
    if (this.subscribers.get(sessionId)?.target !== target) return; // re-targeted since (a RESUME)
    try {
      await this.forget(sessionId);
    } finally {
      if (!ended) this.dropNotices.owe(target); // after forgetting it, so its subscribing again is not undone
    }
  }

  /** Events after `after` (at most `limit`), for a relay resending what its restart lost. */
  async eventsForRelay(after: number, limit: number): Promise<GuildEvent[]> {
    return this.messagesAfter(after, Math.min(limit, MAX_PULL)).map(messageCreateEvent);
  }

  /** Looks in on a fanout that stayed busy; after a restart, resends what it had not handed over. */
  override async alarm(): Promise<void> {
    try {
      await this.checkpoint.alarm(this.resend, () => this.oldestPending());
    } finally {
      await this.dropNotices.alarm(); // after, so the alarm it keeps for notices still owed is not unset
    }
  }

  /** Messages `first`..`last` again, to every live session or relay (sessions drop repeats and pull what they lack before them). */
  private readonly resend = async (first: number, last: number): Promise<void> => {
    if (this.relayCount > 0 && !this.relaysSynced) await this.syncRelays();
    const fanout: Fanout<SessionStub | RelayStub> = this.relayCount > 0 ? this.relays : this.sessions;
    for (const message of this.messagesAfter(first - 1, last - first + 1, last)) {
      const event = messageCreateEvent(message);
      void fanout.publish(() => event);
    }
  };

  /** For the alarm: the oldest seq not yet handed over to a session or relay. */
  private oldestPending(): OldestPending {
    return this.syncing > 0 ? null : oldestPending(this.sessions, this.relays);
  }

  /** For the idle hook, without a scan: everything handed over, or cannot tell (the alarm will). */
  private drainedOrUnknown(): OldestPending {
    return this.syncing === 0 && this.sessions.drained && this.relays.drained ? undefined : null;
  }

  /**
   * Events after `after` (at most `limit`), for a subscribed session that found a gap — or for a
   * session of a member removed lately, up to the last message before the removal.
   */
  async eventsAfter(sessionId: string, after: number, limit: number, userId?: string): Promise<GuildEvent[]> {
    let last = this.lastSeq;
    if (!this.subscribers.has(sessionId)) {
      // A member removed lately: their sessions may still read what was posted before that.
      const departure =
        userId === undefined || !this.guildId
          ? undefined
          : this.sql.exec<{ up_to: number }>("SELECT up_to FROM departures WHERE user_id = ? AND at >= ?", userId, Date.now() - DEPARTURE_KEPT_MS).toArray()[0];
      if (!departure) return [];
      last = departure.up_to;
    }
    // Bounded by seq, not only by count: past pruned messages a count would reach beyond a departure.
    return this.messagesAfter(after, Math.max(0, Math.min(limit, MAX_PULL, last - after)), last).map(messageCreateEvent);
  }

  /** Live sessions and how they are reached, for operators and tests. */
  async fanoutState(): Promise<{ sessions: number; relays: number }> {
    return { sessions: this.subscribers.size, relays: this.relayCount };
  }

  // ---- internals --------------------------------------------------------------------------

  /** Fans `event` out; returns the naive baseline's sends (undefined otherwise). */
  private publish(event: GuildEvent): Promise<void> | undefined {
    const fanout = this.relayCount > 0 ? this.relays : this.sessions;
    if (this.config.transportMode === "bare") return fanout.publish(() => event);
    return publishEvent<SessionStub | RelayStub>(fanout as Fanout<SessionStub | RelayStub>, event, {
      tracer: this.telemetry.tracer,
      tiers: this.config.tiers,
      spanName: "guild.fanout",
      guildId: this.guildId!,
      recipients: this.subscribers.size,
      recipientKind: this.relayCount > 0 ? "relays" : "sessions",
    });
  }

  /** Relay index of a session: a stable hash, so a session stays on its relay. */
  private relayOf(sessionId: string): number {
    let hash = 0x811c9dc5;
    for (let i = 0; i < sessionId.length; i++) hash = Math.imul(hash ^ sessionId.charCodeAt(i), 0x01000193);
    return (hash >>> 0) % this.relayCount;
  }

  private relayName(index: number): string {
    return `${this.guildId}/relay/${index}`;
  }

  /** Assigns sessions to a relay, through the stub its events go by, so they arrive in order. */
  private async assign(index: number, add: RelayAssignment[], remove: string[], replace = false): Promise<Released[]> {
    const recipient = this.relays.get(this.relayName(index));
    const stub = recipient?.stub ?? this.env.RELAY.get(this.env.RELAY.idFromName(this.relayName(index)));
    if (recipient) recipient.stub = stub;
    try {
      return await stub.assign(this.guildId!, add, remove, replace);
    } catch (error) {
      if (recipient?.stub === stub) recipient.stub = undefined; // a stub that threw is broken
      this.relaysSynced = false; // the relay may hold sessions it should not: resynchronise before the next event
      throw error;
    }
  }

  private addRelayRecipients(): void {
    this.relays.clear();
    for (let i = 0; i < this.relayCount; i++) this.relays.add(this.relayName(i), "", this.relayName(i));
  }

  /**
   * Moves every session onto `count` relays, with whatever was still queued for it. Sessions
   * drop repeats and pull gaps by `seq`, so a move can never lose or reorder an event.
   *
   * From relays to more relays, every event still queued for a relay or in flight to one goes
   * to every new relay again, after it learns its sessions: an old relay may fan out what it
   * was sent only after its sessions moved, and a session that missed the last events of a
   * quiet guild would find no later event to show it the gap.
   */
  private async useRelays(count: number): Promise<void> {
    const queued = new Map<string, Incoming<GuildEvent>[]>();
    // In flight too: an RPC abandoned here is not retried if it fails (sessions drop repeats).
    for (const recipient of this.sessions.all()) queued.set(recipient.id, recipient.batch.concat(recipient.queue));
    this.sessions.clear();
    const unsent = new Map<number, Incoming<GuildEvent>>();
    for (const event of this.relays.pending()) unsent.set(normalize(event).message.seq, event);
    this.relayCount = count;
    this.sql.exec("INSERT OR REPLACE INTO meta (key, value) VALUES ('relay_count', ?)", String(count));
    this.addRelayRecipients();
    const synced = this.syncRelays(queued); // assignments go out first, on the stubs events use
    for (const seq of [...unsent.keys()].sort((a, b) => a - b)) this.relays.publish(() => unsent.get(seq)!);
    await synced;
  }

  /**
   * Tells every relay exactly which sessions are its own; what a relay still had queued for a
   * session that moved goes to the session's new relay.
   */
  private async syncRelays(queued = new Map<string, Incoming<GuildEvent>[]>()): Promise<void> {
    this.syncing++;
    try {
      await this.assignAll(queued);
    } catch (error) {
      // Backlogs it was moving may be gone with the failed assignment: resend recent events
      // once the relays are synced again (before the next message, or by the alarm).
      this.checkpoint.resendRecent();
      throw error;
    } finally {
      this.syncing--;
    }
  }

  /** The sync itself; `syncing` counts it while it runs. */
  private async assignAll(queued: Map<string, Incoming<GuildEvent>[]>): Promise<void> {
    this.relaysSynced = true;
    const shares: RelayAssignment[][] = Array.from({ length: this.relayCount }, () => []);
    const assignment = (sessionId: string, backlog: Incoming<GuildEvent>[]): RelayAssignment | null => {
      const subscriber = this.subscribers.get(sessionId);
      return subscriber ? { sessionId, ...subscriber, backlog } : null;
    };
    for (const sessionId of this.subscribers.keys()) shares[this.relayOf(sessionId)]!.push(assignment(sessionId, queued.get(sessionId) ?? [])!);
    // A failed assignment marks relays for another sync before the next event.
    const released = (await Promise.all(shares.map((share, i) => this.assign(i, share, [], true)))).flat();
    const moved = released.map((r) => assignment(r.sessionId, r.backlog)).filter((a) => a !== null && a.backlog.length > 0);
    // Owed again until the new relays have them: a restart meanwhile resends.
    const seqs = seqRange(moved.flatMap((a) => a!.backlog));
    if (seqs) this.checkpoint.accept(seqs.first, seqs.last);
    await Promise.all(moved.map((a) => this.assign(this.relayOf(a!.sessionId), [a!], [])));
  }

  private async forget(sessionId: string): Promise<void> {
    if (!this.subscribers.delete(sessionId)) return;
    this.sql.exec("DELETE FROM subscriptions WHERE session_id = ?", sessionId);
    if (this.relayCount === 0) return void this.sessions.remove(sessionId);
    // Well under the threshold (hysteresis: no flapping around it), relays cost more than they save.
    if (this.subscribers.size < this.config.relayThreshold / 2 && this.syncing === 0) return this.useDirect();
    await this.assign(this.relayOf(sessionId), [], [sessionId]);
  }

  /**
   * Back to delivering to sessions directly, once few are left: otherwise a guild that once
   * peaked keeps every relay it doubled to, one RPC (and a checkpoint row and alarm) per relay per
   * message, for good. What was still queued for the relays goes to the sessions (bare: the
   * relays' envelopes carry a relay's carrier), the relays let every session go, and what they
   * still had for one is queued for it again; sessions drop repeats and pull gaps as ever.
   */
  private async useDirect(): Promise<void> {
    const count = this.relayCount;
    const unsent = new Map<number, GuildEvent>();
    for (const incoming of this.relays.pending()) {
      const { message } = normalize(incoming);
      unsent.set(message.seq, message);
    }
    const backlog = [...unsent.values()].sort((a, b) => a.seq - b.seq);
    this.relayCount = 0;
    this.sql.exec("INSERT OR REPLACE INTO meta (key, value) VALUES ('relay_count', '0')");
    this.addRelayRecipients();
    for (const [sessionId, { userId, target }] of this.subscribers) this.sessions.add(sessionId, userId, target, [...backlog]);
    // What the relays hand back lives only in their answers until it is queued here, and what a
    // restarted relay had not handed over (its own recovery would send it to no one now) nowhere
    // but the log: owe the newest events again, kept across a restart of this object too, so they
    // are resent to the sessions directly; sessions drop repeats and pull anything older they lack.
    this.checkpoint.resendRecent();
    this.syncing++;
    try {
      const released = await Promise.all(
        Array.from({ length: count }, (_, i) => {
          const stub = this.env.RELAY.get(this.env.RELAY.idFromName(this.relayName(i)));
          return stub.assign(this.guildId!, [], [], true);
        }),
      );
      for (const { sessionId, backlog: theirs } of released.flat()) {
        const recipient = this.sessions.get(sessionId);
        if (!recipient || theirs.length === 0) continue;
        // Re-adding abandons the RPC under way, so its events go again too (sessions drop repeats).
        this.sessions.add(sessionId, recipient.userId, recipient.target, [...theirs, ...recipient.batch, ...recipient.queue]);
        const seqs = seqRange(theirs);
        if (seqs) this.checkpoint.accept(seqs.first, seqs.last);
      }
    } catch (error) {
      // What it was sending is owed again already (above); it gets no more events from here.
      console.error(`guild ${this.guildId}: a relay could not let its sessions go; recent events are resent directly:`, error);
    } finally {
      this.syncing--;
      if (this.relayCount > 0) {
        // Sessions came back over the threshold while the releases travelled, and relays were
        // taken on again: a release that reached a relay after its new assignment emptied it, and
        // the backlogs handed back had no session here to go to. Sync the relays again before the
        // next event (or from the alarm), then resend the newest events.
        this.relaysSynced = false;
        this.checkpoint.resendRecent();
      }
    }
  }

  private user(userId: string) {
    return this.env.USER.get(this.env.USER.idFromName(userId));
  }

  private meta(key: string): string | null {
    return this.sql.exec<{ value: string }>("SELECT value FROM meta WHERE key = ?", key).toArray()[0]?.value ?? null;
  }

  /** Records this object's guild id the first time a member is added: that creates the guild. */
  private adopt(guildId: string): void {
    if (this.guildId) return;
    this.createTables();
    this.sql.exec("INSERT OR REPLACE INTO meta (key, value) VALUES ('guild_id', ?)", guildId);
    this.guildId = guildId;
  }

  private exists(guildId: string): boolean {
    return this.guildId === guildId;
  }

  private isMember(userId: string): boolean {
    return this.sql.exec("SELECT 1 FROM members WHERE user_id = ?", userId).toArray().length > 0;
  }

  /** A post that cannot be accepted: unknown guild, not a member, bad content, or over the author's rate (which it counts). */
  private refusePost({ guildId, authorId, content }: CreateMessage): GuildResult<never> | null {
    const denied = this.checkMember(guildId, authorId);
    if (denied) return denied;
    if (!isValidContent(content)) return fail(400, "invalid_content", CONTENT_RULE);
    // Every post that waits holds its content, whatever it waits for (a removal's relays, a relay
    // sync, a recovery, admission): bounded together, before the author's rate is charged.
    if (this.waitingPosts >= MAX_WAITING_POSTS) return fail(429, "rate_limited", "the guild is behind on its deliveries; try again shortly", 1);
    const wait = this.takeToken(authorId);
    return wait > 0 ? fail(429, "rate_limited", "too many messages; slow down", Math.ceil(wait)) : null;
  }

  private checkMember(guildId: string, userId: string): GuildResult<never> | null {
    if (!this.exists(guildId)) return fail(404, "unknown_guild", `guild ${guildId} does not exist`);
    if (!this.isMember(userId)) return fail(403, "not_a_member", `you are not a member of guild ${guildId}`);
    return null;
  }

  /**
   * Deletes messages older than the newest `retention` (the newest is always kept: `lastSeq` is
   * read back from it). A session that pulls past them finds the hole and goes on after it.
   */
  private prune(): void {
    this.sql.exec(
      "DELETE FROM messages WHERE seq <= ? AND seq < (SELECT MIN(seq) FROM messages) + ?",
      this.lastSeq - this.retention,
      PRUNE_AT_MOST,
    );
  }

  /** Stored messages after `after`, up to `upTo`, oldest first. */
  private messagesAfter(after: number, limit: number, upTo = Number.MAX_SAFE_INTEGER): Message[] {
    return this.sql
      .exec<MessageRow>("SELECT seq, id, author_id, content, timestamp FROM messages WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?", after, upTo, limit)
      .toArray()
      .map((row) => this.messageOf(row));
  }

  private messageOf(row: MessageRow): Message {
    return { id: row.id, guild_id: this.guildId!, author_id: row.author_id, content: row.content, seq: row.seq, timestamp: row.timestamp };
  }

  /**
   * Token bucket per author, in memory: a restart forgives, which is fine for a rate limit.
   * Takes a token and answers 0, or answers the seconds until one is due.
   */
  private takeToken(authorId: string): number {
    const now = Date.now();
    const bucket = this.authorBuckets.get(authorId) ?? { tokens: AUTHOR_BURST, at: now };
    bucket.tokens = refilled(bucket, now);
    bucket.at = now;
    if (this.authorBuckets.size >= MAX_AUTHOR_BUCKETS) this.forgetFullBuckets(now);
    this.authorBuckets.set(authorId, bucket);
    if (bucket.tokens < 1) return (1 - bucket.tokens) / AUTHOR_RATE_PER_SECOND;
    bucket.tokens -= 1;
    return 0;
  }

  /** Keeps the map bounded without forgiving anyone: a full bucket is what a new one would be. */
  private forgetFullBuckets(now: number): void {
    for (const [authorId, bucket] of this.authorBuckets) if (refilled(bucket, now) >= AUTHOR_BURST) this.authorBuckets.delete(authorId);
    if (this.authorBuckets.size >= MAX_AUTHOR_BUCKETS) this.authorBuckets.clear(); // that many authors at their limit at once
  }
}


