import { RESUME_BUFFER_MIN_DISPATCHES, RESUME_WINDOW_MS } from "../gateway/protocol.ts";

/**
 * Every dispatch a session sent (or would have sent while disconnected), kept in the object's
 * SQLite storage so that RESUME can replay what a client missed, even across eviction. Keeps at
 * least the last 1,000 dispatches and at least the last 60 seconds.
 */
/** Durable Object SQL binds at most 100 parameters per statement; a row takes 3. */
const ROWS_PER_INSERT = 33;

export class ResumeBuffer {
  private appendedSinceTrim = 0;

  constructor(private readonly sql: SqlStorage) {
    sql.exec("CREATE TABLE IF NOT EXISTS dispatches (s INTEGER PRIMARY KEY, frame TEXT NOT NULL, at INTEGER NOT NULL)");
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
  append(frames: { s: number; frame: string }[], now = Date.now()): void {
    for (let from = 0; from < frames.length; from += ROWS_PER_INSERT) {
      const rows = frames.slice(from, from + ROWS_PER_INSERT);
      const values: (string | number)[] = [];
      for (const { s, frame } of rows) values.push(s, frame, now);
      this.sql.exec(`INSERT INTO dispatches (s, frame, at) VALUES ${rows.map(() => "(?, ?, ?)").join(", ")}`, ...values);
    }
    this.appendedSinceTrim += frames.length;
    if (this.appendedSinceTrim >= 64) this.trim(frames[frames.length - 1]!.s, now);
  }

  /** Frames after `seq`, in order. */
  framesAfter(seq: number): { s: number; frame: string }[] {
    return this.sql.exec<{ s: number; frame: string }>("SELECT s, frame FROM dispatches WHERE s > ? ORDER BY s", seq).toArray();
  }

  /** Copies frames handed over from the session's previous holder. */
  restore(frames: { s: number; frame: string }[], now = Date.now()): void {
    for (const { s, frame } of frames) this.sql.exec("INSERT OR REPLACE INTO dispatches (s, frame, at) VALUES (?, ?, ?)", s, frame, now);
  }

  clear(): void {
    this.sql.exec("DELETE FROM dispatches");
  }

  private trim(lastSeq: number, now: number): void {
    this.appendedSinceTrim = 0;
    this.sql.exec("DELETE FROM dispatches WHERE s <= ? AND at < ?", lastSeq - RESUME_BUFFER_MIN_DISPATCHES, now - RESUME_WINDOW_MS);
  }
}
