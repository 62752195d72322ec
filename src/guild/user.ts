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
    await this.notifySessions((session) => session.guildAdded(guildId));
  }

  async removeGuild(guildId: string): Promise<void> {
    if (this.sql.exec("DELETE FROM guilds WHERE guild_id = ?", guildId).rowsWritten === 0) return;
    await this.notifySessions((session) => session.guildRemoved(guildId));
  }

  private async notifySessions(notify: (session: DurableObjectStub<import("../session/session.ts").Session>) => Promise<{ gone?: true }>): Promise<void> {
    const sessions = this.sql.exec<{ session_id: string; target: string }>("SELECT session_id, target FROM sessions").toArray();
    await Promise.all(
      sessions.map(async ({ session_id, target }) => {
        // A session that answers it has ended, or cannot be reached, ended without detaching: forget it.
        const gone = await notify(this.env.SESSION.get(this.env.SESSION.idFromString(target))).then(
          (answer) => answer.gone === true,
          (error: unknown) => (console.warn(`user directory: session ${session_id} unreachable, forgetting it:`, error), true),
        );
        if (gone) this.sql.exec("DELETE FROM sessions WHERE session_id = ? AND target = ?", session_id, target);
      }),
    );
  }
}
