import type { Session } from "../session/session.ts";

/** Waits before each attempt to tell a session (~2 minutes in all): what made its deliveries fail may still be passing. */
const NOTICE_DELAYS_MS = [1000, 3000, 6000, 15_000, 30_000, 60_000];

/**
 * Sessions that a guild or relay stopped delivering to while they may still be alive, each owed
 * a notice (`Session.guildDropped`) so it subscribes again and pulls what it missed; otherwise
 * it would sit connected, never hearing from the guild again. Kept in storage until told, so a
 * restart (whose next event builds this again) does not forget one. A session that has ended
 * answers the notice too, so only an unreachable one is retried for long.
 */
export class DropNotices {
  /** Targets being told by this instance. */
  private readonly telling = new Set<string>();

  constructor(
    private readonly sql: SqlStorage,
    private readonly ctx: DurableObjectState,
    private readonly sessions: DurableObjectNamespace<Session>,
    private readonly guildId: () => string,
  ) {
    sql.exec("CREATE TABLE IF NOT EXISTS drop_notices (target TEXT PRIMARY KEY)");
    for (const { target } of sql.exec<{ target: string }>("SELECT target FROM drop_notices")) this.tell(target);
  }

  /** The session object `target` is to be told, until it answers. */
  owe(target: string): void {
    this.sql.exec("INSERT OR IGNORE INTO drop_notices (target) VALUES (?)", target);
    this.tell(target);
  }

  private tell(target: string): void {
    if (this.telling.has(target)) return;
    this.telling.add(target);
    this.ctx.waitUntil(this.attempts(target).finally(() => this.telling.delete(target)));
  }

  private async attempts(target: string): Promise<void> {
    for (const delayMs of NOTICE_DELAYS_MS) {
      await scheduler.wait(delayMs);
      try {
        await this.sessions.get(this.sessions.idFromString(target)).guildDropped(this.guildId());
        break;
      } catch (error) {
        console.warn(`guild ${this.guildId()}: could not tell session ${target} it was dropped:`, error);
      }
    }
    this.sql.exec("DELETE FROM drop_notices WHERE target = ?", target);
  }
}
