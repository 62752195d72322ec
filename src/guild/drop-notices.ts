import type { Session } from "../session/session.ts";

/** A first attempt this soon after the drop: what made deliveries fail may still be passing. */
const FIRST_ATTEMPT_MS = 1000;
/** After this long, a session that still cannot be reached is given up on (it has most likely ended). */
const GIVE_UP_MS = 2 * 60_000;

/**
 * Sessions that a guild or relay stopped delivering to while they may still be alive, each owed
 * a notice (`Session.guildDropped`) so it subscribes again and pulls what it missed; otherwise
 * it would sit connected, never hearing from the guild again.
 *
 * A notice is kept in storage until the session answers (one that has ended answers too), so
 * neither a restart nor an eviction forgets it. It is tried once a second after the drop, then
 * on each of the owner's alarms (the owner's `arm` keeps one pending while any is owed) — a
 * timer alone might never fire in a Durable Object nothing else keeps awake. A session dropped
 * again while a notice is on its way is owed another: each drop bumps the row's generation, and
 * only an answer to the newest removes it.
 */
export class DropNotices {
  constructor(
    private readonly sql: SqlStorage,
    private readonly ctx: DurableObjectState,
    private readonly sessions: DurableObjectNamespace<Session>,
    private readonly guildId: () => string,
    private readonly arm: () => void,
  ) {
    sql.exec("CREATE TABLE IF NOT EXISTS drop_notices (target TEXT PRIMARY KEY, owed_since INTEGER NOT NULL, generation INTEGER NOT NULL)");
  }

  /** The session object `target` is to be told, until it answers. */
  owe(target: string): void {
    this.sql.exec(
      "INSERT INTO drop_notices (target, owed_since, generation) VALUES (?, ?, 1) ON CONFLICT (target) DO UPDATE SET owed_since = excluded.owed_since, generation = generation + 1",
      target,
      Date.now(),
    );
    this.arm();
    this.ctx.waitUntil(scheduler.wait(FIRST_ATTEMPT_MS).then(() => this.attempt(target)));
  }

  /** From the owner's alarm: one attempt at every notice still owed. */
  async alarm(): Promise<void> {
    const owed = this.sql.exec<{ target: string }>("SELECT target FROM drop_notices").toArray();
    await Promise.all(owed.map(({ target }) => this.attempt(target)));
    if (this.sql.exec("SELECT 1 FROM drop_notices LIMIT 1").toArray().length > 0) this.arm();
  }

  private async attempt(target: string): Promise<void> {
    const row = this.sql.exec<{ owed_since: number; generation: number }>("SELECT owed_since, generation FROM drop_notices WHERE target = ?", target).toArray()[0];
    if (!row) return; // answered already
    try {
      await this.sessions.get(this.sessions.idFromString(target)).guildDropped(this.guildId());
    } catch (error) {
      if (Date.now() - row.owed_since < GIVE_UP_MS) {
        console.warn(`guild ${this.guildId()}: could not tell session ${target} it was dropped; trying again:`, error);
        return;
      }
      console.warn(`guild ${this.guildId()}: giving up telling session ${target} it was dropped:`, error);
    }
    this.sql.exec("DELETE FROM drop_notices WHERE target = ? AND generation = ?", target, row.generation);
  }
}
