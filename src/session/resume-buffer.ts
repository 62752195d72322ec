import { RESUME_BUFFER_MIN_DISPATCHES, RESUME_WINDOW_MS } from "../gateway/protocol.ts";

/** One dispatch as sent; a guild event's row also records how far the session got in that guild. */
export interface BufferedDispatch {
  s: number;
  frame: string;
  guildId?: string;
  guildSeq?: number;
}

/**
 * Dispatches appended between trims. A trim is two statements whatever it deletes, and a
 * statement's fixed cost dominates here, so trimming seldom and in bulk is cheaper: the buffer
 * holds at most this many rows beyond what it must keep.
 */
const TRIM_EVERY = 256;

/** Durable Object SQL binds at most 100 parameters per statement; a row takes 5. */
const ROWS_PER_INSERT = 20;

/**
 * What RESUME needs, in the object's SQLite storage so it survives hibernation and eviction:
 * every dispatch the session sent (or would have sent while disconnected) — at least the last
 * 1,000 and at least the last 60 seconds — and the session's position (last `seq` dispatched)
 * in each guild it is subscribed to.
 *
 * A position moves with every guild event, so it is not rewritten per delivery: the dispatch
 * row records it, and the `guilds` table is brought up to date only before rows are trimmed.
 * A delivery then costs one statement, not two.
 */
export class ResumeBuffer {
  private appendedSinceTrim = 0;

  constructor(private readonly sql: SqlStorage) {
    sql.exec(`
      CREATE TABLE IF NOT EXISTS dispatches (s INTEGER PRIMARY KEY, frame TEXT NOT NULL, at INTEGER NOT NULL, guild_id TEXT, guild_seq INTEGER);
      CREATE TABLE IF NOT EXISTS guilds (guild_id TEXT PRIMARY KEY, last_seq INTEGER NOT NULL);
    `);
    // Buffers written before dispatch rows carried guild positions.
    if (!sql.exec("SELECT * FROM dispatches LIMIT 0").columnNames.includes("guild_id")) {
      sql.exec("ALTER TABLE dispatches ADD COLUMN guild_id TEXT; ALTER TABLE dispatches ADD COLUMN guild_seq INTEGER;");
    }
  }

  /** Sequence of the newest dispatch kept, 0 when empty. */
  lastSeq(): number {
    return this.sql.exec<{ s: number | null }>("SELECT MAX(s) AS s FROM dispatches").one().s ?? 0;
  }

  /** Sequence of the oldest dispatch still kept, or null when empty. */
  oldestSeq(): number | null {
    return this.sql.exec<{ s: number | null }>("SELECT MIN(s) AS s FROM dispatches").one().s;
  }

  /** Stores consecutive dispatches, in as few statements as SQLite's variable limit allows. */
  append(dispatches: BufferedDispatch[], now = Date.now()): void {
    for (let from = 0; from < dispatches.length; from += ROWS_PER_INSERT) {
      const rows = dispatches.slice(from, from + ROWS_PER_INSERT);
      const values: (string | number | null)[] = [];
      for (const { s, frame, guildId, guildSeq } of rows) values.push(s, frame, now, guildId ?? null, guildSeq ?? null);
      this.sql.exec(`INSERT INTO dispatches (s, frame, at, guild_id, guild_seq) VALUES ${placeholders(rows.length)}`, ...values);
    }
    this.appendedSinceTrim += dispatches.length;
    if (this.appendedSinceTrim >= TRIM_EVERY) this.trim(dispatches[dispatches.length - 1]!.s, now);
  }

  /** Frames after `seq`, in order. */
  framesAfter(seq: number): { s: number; frame: string }[] {
    return this.sql.exec<{ s: number; frame: string }>("SELECT s, frame FROM dispatches WHERE s > ? ORDER BY s", seq).toArray();
  }

  /** Copies frames handed over from the session's previous holder. */
  restore(frames: { s: number; frame: string }[], now = Date.now()): void {
    for (const { s, frame } of frames) this.sql.exec("INSERT OR REPLACE INTO dispatches (s, frame, at) VALUES (?, ?, ?)", s, frame, now);
  }

  /**
   * Last seq dispatched in each subscribed guild: its row, or its newest dispatch if later. A
   * guild's dispatches go out in seq order, so the newest is found by reading back from the end.
   */
  positions(): Map<string, number> {
    const rows = this.sql.exec<{ guild_id: string; last_seq: number }>(`
      SELECT guild_id, MAX(last_seq, IFNULL((SELECT guild_seq FROM dispatches d WHERE d.guild_id = g.guild_id ORDER BY s DESC LIMIT 1), 0)) AS last_seq
      FROM guilds g ORDER BY guild_id
    `);
    return new Map(Array.from(rows, (row) => [row.guild_id, row.last_seq]));
  }

  /** Subscribes to a guild at `lastSeq`, or moves the position there (not via a dispatch). */
  setPosition(guildId: string, lastSeq: number): void {
    this.sql.exec("INSERT OR REPLACE INTO guilds (guild_id, last_seq) VALUES (?, ?)", guildId, lastSeq);
  }

  /** Unsubscribed: the guild's dispatch rows no longer count as a position. */
  deletePosition(guildId: string): void {
    this.sql.exec("DELETE FROM guilds WHERE guild_id = ?", guildId);
  }

  /** Forgets every dispatch and position. */
  clear(): void {
    this.sql.exec("DELETE FROM dispatches; DELETE FROM guilds;");
  }

  /** Drops old dispatches, after saving the positions they hold. */
  private trim(lastSeq: number, now: number): void {
    this.appendedSinceTrim = 0;
    const old = [lastSeq - RESUME_BUFFER_MIN_DISPATCHES, now - RESUME_WINDOW_MS];
    this.sql.exec(
      `UPDATE guilds SET last_seq = MAX(last_seq, IFNULL((
         SELECT MAX(guild_seq) FROM dispatches WHERE s <= ?1 AND at < ?2 AND guild_id = guilds.guild_id
       ), 0))`,
      ...old,
    );
    this.sql.exec("DELETE FROM dispatches WHERE s <= ?1 AND at < ?2", ...old);
  }
}

const placeholderCache = new Map<number, string>();
function placeholders(rows: number): string {
  let text = placeholderCache.get(rows);
  if (text === undefined) {
    text = Array.from({ length: rows }, () => "(?, ?, ?, ?, ?)").join(", ");
    placeholderCache.set(rows, text);
  }
  return text;
}
