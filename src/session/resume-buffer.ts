import { RESUME_BUFFER_MIN_DISPATCHES, RESUME_WINDOW_MS } from "../gateway/protocol.ts";

/** One dispatch as sent; a guild event's row also records how far the session got in that guild. */
export interface BufferedDispatch {
  s: number;
  frame: string;
  guildId?: string;
  guildSeq?: number;
  /** When it was first stored: kept through a hand-off, so a RESUME does not make it young again. */
  at?: number;
}

/**
 * Dispatches appended between trims. A trim is two statements whatever it deletes, and a
 * statement's fixed cost dominates here, so trimming seldom and in bulk is cheaper: the buffer
 * holds at most this many dispatches (and the rest of a run) beyond what it must keep.
 */
const TRIM_EVERY = 256;

/** Durable Object SQL binds at most 100 parameters per statement; a row takes 6. */
const ROWS_PER_INSERT = 16;

/**
 * Frame text per row, in UTF-16 code units. JSON-escaped and UTF-8-encoded, a unit takes at most
 * 6 bytes, so a row stays well under the 2 MB a Durable Object's SQL row may hold.
 */
const MAX_RUN_UNITS = 128 * 1024;

/**
 * What RESUME needs, in the object's SQLite storage so it survives hibernation and eviction:
 * every dispatch the session sent (or would have sent while disconnected) — at least the last
 * 1,000 and at least the last 60 seconds — and the session's position (last `seq` dispatched)
 * in each guild it is subscribed to.
 *
 * Dispatches are stored in runs: one row holds consecutive dispatches (a delivery's, typically)
 * as a JSON array of frames. SQLite's cost is mostly per row and per statement, not per byte, so
 * a 20-message delivery costs one row instead of 20, and Cloudflare bills rows written.
 *
 * A position moves with every guild event, so it is not rewritten per delivery: a run holds
 * events of one guild at most and records the position its last one reached, and the `guilds`
 * table is brought up to date only before runs are trimmed.
 */
export class ResumeBuffer {
  private appendedSinceTrim = 0;

  constructor(private readonly sql: SqlStorage) {
    sql.exec(`
      CREATE TABLE IF NOT EXISTS dispatch_runs (first_s INTEGER PRIMARY KEY, last_s INTEGER NOT NULL, frames TEXT NOT NULL, at INTEGER NOT NULL, guild_id TEXT, guild_seq INTEGER);
      CREATE TABLE IF NOT EXISTS guilds (guild_id TEXT PRIMARY KEY, last_seq INTEGER NOT NULL);
    `);
    if (sql.exec("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'dispatches'").toArray().length > 0) {
      upgradeRowPerDispatch(sql);
    }
    // The count of appends since the last trim lives in memory, and a hibernating session is a new
    // object at every wake-up: start from what the buffer holds beyond what it must keep, or a
    // session woken for each delivery (a quiet guild) would never trim.
    const oldest = this.oldestSeq();
    if (oldest !== null) this.appendedSinceTrim = Math.max(0, this.lastSeq() - oldest + 1 - RESUME_BUFFER_MIN_DISPATCHES);
  }

  /** Sequence of the newest dispatch kept, 0 when empty. */
  lastSeq(): number {
    return this.sql.exec<{ last_s: number }>("SELECT last_s FROM dispatch_runs ORDER BY first_s DESC LIMIT 1").toArray()[0]?.last_s ?? 0;
  }

  /** Sequence of the oldest dispatch still kept, or null when empty. */
  oldestSeq(): number | null {
    return this.sql.exec<{ s: number | null }>("SELECT MIN(first_s) AS s FROM dispatch_runs").one().s;
  }

  /** Stores dispatches (consecutive as a session numbers them) in as few rows and statements as it can. */
  append(dispatches: BufferedDispatch[], now = Date.now()): void {
    if (dispatches.length === 0) return;
    this.insert(runsOf(dispatches), now);
    this.appendedSinceTrim += dispatches.length;
    if (this.appendedSinceTrim >= TRIM_EVERY) this.trim(dispatches[dispatches.length - 1]!.s, now);
  }

  /** Frames after `seq`, in order. */
  framesAfter(seq: number): { s: number; frame: string }[] {
    return this.agedFramesAfter(seq).frames.map(({ s, frame }) => ({ s, frame }));
  }

  /**
   * Frames after `seq`, in order, each with when it was first stored: what a hand-off carries.
   * Stops once they hold `maxUnits` of text (one frame at least); `more` says frames are left.
   * Rows are read as they are needed, so a page costs its own size in memory, not the buffer's.
   */
  agedFramesAfter(seq: number, maxUnits = Infinity): { frames: { s: number; frame: string; at: number }[]; more: boolean } {
    const rows = this.sql.exec<{ first_s: number; frames: string; at: number }>("SELECT first_s, frames, at FROM dispatch_runs WHERE last_s > ? ORDER BY first_s", seq);
    const frames: { s: number; frame: string; at: number }[] = [];
    let units = 0;
    for (const row of rows) {
      const runFrames = JSON.parse(row.frames) as string[];
      for (let i = 0; i < runFrames.length; i++) {
        const s = row.first_s + i;
        if (s <= seq) continue;
        if (units >= maxUnits) return { frames, more: true };
        const frame = runFrames[i]!;
        frames.push({ s, frame, at: row.at });
        units += frame.length;
      }
    }
    return { frames, more: false };
  }

  /**
   * Stores frames handed over by the session's previous holder (all of them, or the next page),
   * each as old as it was there (one from a holder that sent no age counts from now).
   */
  takeHandedOver(frames: { s: number; frame: string; at?: number }[], now = Date.now()): void {
    this.insert(runsOf(frames), now);
  }

  /**
   * Last seq dispatched in each subscribed guild: its row, or its newest run if later. A guild's
   * dispatches go out in seq order, so the newest is found by reading back from the end.
   */
  positions(): Map<string, number> {
    const rows = this.sql.exec<{ guild_id: string; last_seq: number }>(`
      SELECT guild_id, MAX(last_seq, IFNULL((SELECT guild_seq FROM dispatch_runs d WHERE d.guild_id = g.guild_id ORDER BY first_s DESC LIMIT 1), 0)) AS last_seq
      FROM guilds g ORDER BY guild_id
    `);
    return new Map(Array.from(rows, (row) => [row.guild_id, row.last_seq]));
  }

  /** Subscribes to a guild at `lastSeq`, or moves the position there (not via a dispatch). */
  setPosition(guildId: string, lastSeq: number): void {
    this.sql.exec("INSERT OR REPLACE INTO guilds (guild_id, last_seq) VALUES (?, ?)", guildId, lastSeq);
  }

  /** Unsubscribed: the guild's runs no longer count as a position. */
  deletePosition(guildId: string): void {
    this.sql.exec("DELETE FROM guilds WHERE guild_id = ?", guildId);
  }

  /** Forgets every dispatch and position. */
  clear(): void {
    this.sql.exec("DELETE FROM dispatch_runs; DELETE FROM guilds;");
  }

  private insert(runs: Run[], now: number): void {
    for (let from = 0; from < runs.length; from += ROWS_PER_INSERT) {
      const rows = runs.slice(from, from + ROWS_PER_INSERT);
      const values: (string | number | null)[] = [];
      for (const run of rows) values.push(run.firstS, run.lastS, JSON.stringify(run.frames), run.at ?? now, run.guildId ?? null, run.guildSeq ?? null);
      this.sql.exec(`INSERT OR REPLACE INTO dispatch_runs (first_s, last_s, frames, at, guild_id, guild_seq) VALUES ${placeholders(rows.length)}`, ...values);
    }
  }

  /**
   * Drops runs whose dispatches are all old, after saving the positions they hold. Runs do not
   * overlap, so `first_s <= ?1` adds nothing but lets SQLite walk the primary key.
   */
  private trim(lastSeq: number, now: number): void {
    this.appendedSinceTrim = 0;
    const old = [lastSeq - RESUME_BUFFER_MIN_DISPATCHES, now - RESUME_WINDOW_MS];
    this.sql.exec(
      `UPDATE guilds SET last_seq = MAX(last_seq, IFNULL((
         SELECT MAX(guild_seq) FROM dispatch_runs WHERE first_s <= ?1 AND last_s <= ?1 AND at < ?2 AND guild_id = guilds.guild_id
       ), 0))`,
      ...old,
    );
    this.sql.exec("DELETE FROM dispatch_runs WHERE first_s <= ?1 AND last_s <= ?1 AND at < ?2", ...old);
  }
}

/** Consecutive dispatches stored in one row; `guildSeq` is the position its last guild event reached. */
interface Run {
  firstS: number;
  lastS: number;
  frames: string[];
  units: number;
  guildId?: string;
  guildSeq?: number;
  at?: number;
}

/** Splits dispatches into runs: a new run starts at a gap in `s`, at a second guild, at another age, or when a row would grow too big. */
function runsOf(dispatches: Iterable<BufferedDispatch>): Run[] {
  const runs: Run[] = [];
  let run: Run | undefined;
  for (const dispatch of dispatches) {
    const { s, frame, guildId, guildSeq, at } = dispatch;
    if (run === undefined || !continues(run, dispatch)) {
      run = { firstS: s, lastS: s, frames: [], units: 0, ...(at === undefined ? {} : { at }) };
      runs.push(run);
    }
    run.lastS = s;
    run.frames.push(frame);
    run.units += frame.length;
    if (guildId !== undefined) {
      run.guildId = guildId;
      run.guildSeq = guildSeq;
    }
  }
  return runs;
}

function continues(run: Run, { s, frame, guildId, at }: BufferedDispatch): boolean {
  return (
    s === run.lastS + 1 &&
    at === run.at &&
    (guildId === undefined || run.guildId === undefined || guildId === run.guildId) &&
    run.units + frame.length <= MAX_RUN_UNITS
  );
}

/**
 * Buffers written by earlier versions kept a row per dispatch (the oldest without guild
 * positions); each becomes a run of one, in the same synchronous turn, so it commits as a whole.
 */
function upgradeRowPerDispatch(sql: SqlStorage): void {
  const guild = sql.exec("SELECT * FROM dispatches LIMIT 0").columnNames.includes("guild_id") ? "guild_id, guild_seq" : "NULL, NULL";
  sql.exec(`
    INSERT OR IGNORE INTO dispatch_runs (first_s, last_s, frames, at, guild_id, guild_seq) SELECT s, s, json_array(frame), at, ${guild} FROM dispatches;
    DROP TABLE dispatches;
  `);
}

const placeholderCache = new Map<number, string>();
function placeholders(rows: number): string {
  let text = placeholderCache.get(rows);
  if (text === undefined) {
    text = Array.from({ length: rows }, () => "(?, ?, ?, ?, ?, ?)").join(", ");
    placeholderCache.set(rows, text);
  }
  return text;
}
