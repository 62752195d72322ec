import { DurableObject } from "cloudflare:workers";
import type { Env } from "../env.ts";
import type { Session } from "../session/session.ts";

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
    `);
  }

  /** Registers a live session (or its new holder after a resume); returns the user's guilds. */
  async attachSession(sessionId: string, target: string): Promise<string[]> {
    this.sql.exec(
      "INSERT INTO sessions (session_id, target) VALUES (?, ?) ON CONFLICT (session_id) DO UPDATE SET target = excluded.target",
      sessionId,
      target,
    );
    return this.guilds();
  }

  async detachSession(sessionId: string): Promise<void> {
    this.sql.exec("DELETE FROM sessions WHERE session_id = ?", sessionId);
  }

  async guilds(): Promise<string[]> {
    return this.sql.exec<{ guild_id: string }>("SELECT guild_id FROM guilds ORDER BY guild_id").toArray().map((r) => r.guild_id);
  }

  async addGuild(guildId: string): Promise<void> {
    if (this.sql.exec("INSERT OR IGNORE INTO guilds (guild_id) VALUES (?)", guildId).rowsWritten === 0) return;
    await this.notifySessions(guildId, (session) => session.guildAdded(guildId));
  }

  async removeGuild(guildId: string): Promise<void> {
    if (this.sql.exec("DELETE FROM guilds WHERE guild_id = ?", guildId).rowsWritten === 0) return;
    await this.notifySessions(guildId, (session) => session.guildRemoved(guildId));
  }

  /**
   * Tells every live session. One that answers it has ended is forgotten; one that cannot be
   * reached is tried again in the background (the change is not held up), and forgotten only
   * if it stays unreachable: forgetting a live session at the first error would leave it out
   * of every later membership change. A retry stops once a newer change to the same guild is
   * sent to that session, so a late removal cannot undo a later addition.
   */
  private async notifySessions(guildId: string, notify: Notify): Promise<void> {
    const sessions = this.sql.exec<{ session_id: string; target: string }>("SELECT session_id, target FROM sessions").toArray();
    await Promise.all(
      sessions.map(async ({ session_id, target }) => {
        const key = `${target} ${guildId}`;
        const change = ++this.changesSent;
        this.latestChange.set(key, change);
        const isLatest = () => this.latestChange.get(key) === change;
        const answer = await this.tell(target, notify);
        if (answer === "unreachable") {
          this.ctx.waitUntil(this.retry(session_id, target, notify, isLatest).finally(() => isLatest() && this.latestChange.delete(key)));
          return;
        }
        if (answer === "gone") this.forget(session_id, target);
        if (isLatest()) this.latestChange.delete(key);
      }),
    );
  }

  /** Per session object and guild, the newest membership change sent (numbered by `changesSent`): a retry of an older one gives way. */
  private readonly latestChange = new Map<string, number>();
  private changesSent = 0;

  private async retry(sessionId: string, target: string, notify: Notify, isLatest: () => boolean): Promise<void> {
    for (const delayMs of RETRY_DELAYS_MS) {
      await scheduler.wait(delayMs);
      if (!isLatest()) return;
      const answer = await this.tell(target, notify);
      if (answer === "told") return;
      if (answer === "gone") break;
    }
    console.warn(`user directory: forgetting session ${sessionId}, which has ended or stayed unreachable`);
    this.forget(sessionId, target);
  }

  private tell(target: string, notify: Notify): Promise<"told" | "gone" | "unreachable"> {
    return notify(this.env.SESSION.get(this.env.SESSION.idFromString(target))).then(
      (answer) => (answer.gone === true ? "gone" : "told"),
      (error: unknown) => (console.warn(`user directory: session ${target} unreachable:`, error), "unreachable"),
    );
  }

  private forget(sessionId: string, target: string): void {
    this.sql.exec("DELETE FROM sessions WHERE session_id = ? AND target = ?", sessionId, target);
  }
}

type Notify = (session: DurableObjectStub<Session>) => Promise<{ gone?: true }>;

/** Waits before each retry of a membership change to a session that could not be reached. */
const RETRY_DELAYS_MS = [1000, 3000, 6000];
