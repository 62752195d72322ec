import { DurableObject } from "cloudflare:workers";
import type { Env } from "../env.ts";

/**
 * One per user: which guilds the user belongs to (so READY can list them) and which sessions
 * the user has live (so membership changes reach them). Guilds keep the member lists; this is
 * the index the other way round.
 */
export class User extends DurableObject<Env> {
  private readonly sql: SqlStorage;

  constructor(ctx: DurableObjectState, env: Env) {
    super(ctx, env);
    this.sql = ctx.storage.sql;
    this.sql.exec(`
      CREATE TABLE IF NOT EXISTS guilds (guild_id TEXT PRIMARY KEY);
      CREATE TABLE IF NOT EXISTS sessions (session_id TEXT PRIMARY KEY, target TEXT NOT NULL);
      CREATE TABLE IF NOT EXISTS pending_notices (target TEXT NOT NULL, guild_id TEXT NOT NULL, session_id TEXT NOT NULL, change TEXT NOT NULL, owed_since INTEGER NOT NULL, PRIMARY KEY (target, guild_id));
      CREATE TABLE IF NOT EXISTS session_start_allowance (id INTEGER PRIMARY KEY CHECK (id = 1), tokens REAL NOT NULL, at INTEGER NOT NULL);
    `);
  }

  /**
   * Registers a live session (or its new holder after a resume); returns the user's guilds, or
   * `null` when a new session is refused: the user's session starts are used up (see
   * `takeSessionStart`), or it would be past MAX_SESSIONS_PER_USER live ones. A resume is not
   * refused here: its session holds a place already, and it asked `allowResume` first.
   * (`resuming` defaults to true because sessions of earlier versions pass nothing for a resume.)
   */
  async attachSession(sessionId: string, target: string, resuming = true): Promise<string[] | null> {
    if (!resuming && !this.takeSessionStart()) return null;
    if (!resuming && this.liveSessions() >= MAX_SESSIONS_PER_USER) {
      // Sessions that ended without detaching (their object failed to say so) must not hold places for good.
      await this.forgetEndedSessions();
      if (this.liveSessions() >= MAX_SESSIONS_PER_USER) return null;
    }
    this.sql.exec(
      "INSERT INTO sessions (session_id, target) VALUES (?, ?) ON CONFLICT (session_id) DO UPDATE SET target = excluded.target",
      sessionId,
      target,
    );
    return this.guilds();
  }

  /** May a RESUME of this user go ahead? It takes a session start, as an IDENTIFY does. */
  async allowResume(): Promise<boolean> {
    return this.takeSessionStart();
  }

  /**
   * One session start (an IDENTIFY or a RESUME) off the user's allowance: SESSION_START_BURST,
   * then SESSION_STARTS_PER_SECOND, as a token bucket stored so an eviction does not refill it.
   * False when none is left, and nothing is taken then. Each start subscribes in every guild of
   * the user, so a client looping IDENTIFY (or RESUME) and close loads them all, however few
   * sessions it holds at once.
   */
  private takeSessionStart(): boolean {
    const now = Date.now();
    const last = this.sql.exec<{ tokens: number; at: number }>("SELECT tokens, at FROM session_start_allowance").toArray()[0];
    const tokens = last ? Math.min(SESSION_START_BURST, last.tokens + (Math.max(0, now - last.at) / 1000) * SESSION_STARTS_PER_SECOND) : SESSION_START_BURST;
    if (tokens < 1) return false;
    // A clock that stepped back must not move the refill's starting point back (and credit it twice).
    this.sql.exec("INSERT OR REPLACE INTO session_start_allowance (id, tokens, at) VALUES (1, ?, ?)", tokens - 1, Math.max(now, last?.at ?? now));
    return true;
  }

  private liveSessions(): number {
    return this.sql.exec<{ n: number }>("SELECT COUNT(*) AS n FROM sessions").one().n;
  }

  private async forgetEndedSessions(): Promise<void> {
    const sessions = this.sql.exec<{ session_id: string; target: string }>("SELECT session_id, target FROM sessions").toArray();
    await Promise.all(
      sessions.map(async ({ session_id, target }) => {
        const held = await this.env.SESSION.get(this.env.SESSION.idFromString(target))
          .isHeld()
          .catch(() => true); // unreachable: maybe alive
        if (!held) this.forget(session_id, target);
      }),
    );
  }

  async detachSession(sessionId: string): Promise<void> {
    this.sql.exec("DELETE FROM sessions WHERE session_id = ?", sessionId);
  }

  async guilds(): Promise<string[]> {
    return this.sql.exec<{ guild_id: string }>("SELECT guild_id FROM guilds ORDER BY guild_id").toArray().map((r) => r.guild_id);
  }

  async addGuild(guildId: string): Promise<void> {
    if (this.sql.exec("INSERT OR IGNORE INTO guilds (guild_id) VALUES (?)", guildId).rowsWritten === 0) return;
    await this.notifySessions(guildId, "added");
  }

  async removeGuild(guildId: string): Promise<void> {
    if (this.sql.exec("DELETE FROM guilds WHERE guild_id = ?", guildId).rowsWritten === 0) return;
    await this.notifySessions(guildId, "removed");
  }

  /**
   * Tells every live session. The notice is owed to each, with an alarm set, in the same write as
   * the change and before anyone is told: a reset while telling leaves them owed and the alarm
   * tells them (the guild's retry of the change finds it made and does nothing). One told, or
   * ended (forgotten), is owed nothing more. One that cannot be reached stays owed, tried again
   * from the alarm (1 s, then every 3 s) without holding up the change, and is forgotten only if
   * it stays unreachable for `FORGET_AFTER_MS`: forgetting a live session at the first error
   * would leave it out of every later membership change. A newer change to the same guild
   * replaces a pending one, so a late removal cannot undo a later addition.
   */
  private async notifySessions(guildId: string, change: Change): Promise<void> {
    const sessions = this.sql.exec<{ session_id: string; target: string }>("SELECT session_id, target FROM sessions").toArray();
    if (sessions.length === 0) return;
    // Strictly increasing, so a notice settles only itself, never a newer change of the same millisecond.
    const since = (this.lastOwedSince = Math.max(Date.now(), this.lastOwedSince + 1));
    // Whatever is owed already has its alarm coming (moving it later would hold back their retries).
    const alarmComing = this.sql.exec("SELECT 1 FROM pending_notices LIMIT 1").toArray().length > 0;
    for (const { session_id, target } of sessions) {
      this.sql.exec(
        "INSERT OR REPLACE INTO pending_notices (target, guild_id, session_id, change, owed_since) VALUES (?, ?, ?, ?, ?)",
        target,
        guildId,
        session_id,
        change,
        since,
      );
    }
    const fail = (error: unknown) => console.error("user directory: its alarm could not be set or removed:", error);
    if (!alarmComing) this.ctx.storage.setAlarm(since + FIRST_RETRY_MS).catch(fail);
    await Promise.all(
      sessions.map(async ({ session_id, target }) => {
        const answer = await this.tell(target, guildId, change);
        if (answer === "unreachable") return;
        this.settleNotice(target, guildId, change, since);
        if (answer === "gone") this.forget(session_id, target);
      }),
    );
    // Every session told: no wake-up needed. Some still owed: an alarm is coming, unless setting one failed.
    if (this.sql.exec("SELECT 1 FROM pending_notices LIMIT 1").toArray().length === 0) await this.ctx.storage.deleteAlarm().catch(fail);
    else if ((await this.ctx.storage.getAlarm()) === null) await this.ctx.storage.setAlarm(Date.now() + FIRST_RETRY_MS).catch(fail);
  }

  /** `owed_since` of the last notices owed (see notifySessions). */
  private lastOwedSince = 0;

  /** A notice is no longer owed, unless a newer change replaced it meanwhile. */
  private settleNotice(target: string, guildId: string, change: Change, since: number): void {
    this.sql.exec("DELETE FROM pending_notices WHERE target = ? AND guild_id = ? AND change = ? AND owed_since = ?", target, guildId, change, since);
  }

  /** Tries every pending notice once; keeps an alarm while any is left. */
  override async alarm(): Promise<void> {
    const pending = this.sql
      .exec<{ target: string; guild_id: string; session_id: string; change: Change; owed_since: number }>("SELECT * FROM pending_notices")
      .toArray();
    await Promise.all(
      pending.map(async ({ target, guild_id, session_id, change, owed_since }) => {
        const answer = await this.tell(target, guild_id, change);
        if (answer === "unreachable" && Date.now() - owed_since < FORGET_AFTER_MS) return;
        // Told, ended, or unreachable for too long (ended without detaching, most likely).
        this.settleNotice(target, guild_id, change, owed_since);
        if (answer === "told") return;
        if (answer === "unreachable") console.warn(`user directory: forgetting session ${session_id}, unreachable since ${new Date(owed_since).toISOString()}`);
        this.forget(session_id, target);
      }),
    );
    if (this.sql.exec("SELECT 1 FROM pending_notices LIMIT 1").toArray().length > 0) await this.ctx.storage.setAlarm(Date.now() + RETRY_EVERY_MS);
  }

  private tell(target: string, guildId: string, change: Change): Promise<"told" | "gone" | "unreachable"> {
    const session = this.env.SESSION.get(this.env.SESSION.idFromString(target));
    return (change === "added" ? session.guildAdded(guildId) : session.guildRemoved(guildId)).then(
      // Sessions of versions before 9a5867e answer nothing (still running during a gradual deployment).
      (answer: { gone?: true } | undefined) => (answer?.gone === true ? "gone" : "told"),
      (error: unknown) => (console.warn(`user directory: session ${target} unreachable:`, error), "unreachable"),
    );
  }

  private forget(sessionId: string, target: string): void {
    this.sql.exec("DELETE FROM sessions WHERE session_id = ? AND target = ?", sessionId, target);
    this.sql.exec("DELETE FROM pending_notices WHERE target = ?", target);
  }
}

type Change = "added" | "removed";

/**
 * Live sessions one user may have at once (including disconnected ones still resumable). Each is
 * subscribed to every guild of the user, so without a bound one client identifying over and over
 * would multiply the fanout of every guild it is in.
 */
export const MAX_SESSIONS_PER_USER = 32;

/** IDENTIFYs and RESUMEs one user may make in quick succession, and how many more each second after that. */
export const SESSION_START_BURST = 60;
export const SESSION_STARTS_PER_SECOND = 1;

/** When a membership change that could not reach a session is tried again, and how long before it is forgotten. */
const FIRST_RETRY_MS = 1000;
const RETRY_EVERY_MS = 3000;
const FORGET_AFTER_MS = 15_000;
