import { normalize } from "../transport/index.ts";
import type { Fanout } from "./fanout.ts";

/** How long a fanout may stay busy before its alarm looks in on it (and, after a restart, resends). */
export const FANOUT_CHECK_MS = 5_000;

/** Resends events after `after`, through `through`, to whoever should have them now. */
export type Resend = (after: number, through: number) => Promise<void>;

/**
 * The oldest seq a fanout has not handed over, `undefined` when it has handed over everything,
 * `null` when it cannot tell (events in transit elsewhere): then it makes no progress.
 */
export type OldestPending = number | undefined | null;

/**
 * How far a guild's or relay's fanout got, kept durably, so that one restarted in the middle of
 * a fanout (a deploy, a crash: its queues lived in memory) resends what it had not handed over.
 * Otherwise sessions would notice the gap only when the next message came, which in a quiet
 * guild may be never. Resending too much is harmless: sessions drop repeats by `seq`.
 *
 * Cheap on the hot path: `accept` writes one small row per call (a guild makes it with each
 * message it stores anyway, a relay with each event it is sent) and sets an alarm once per busy spell;
 * `progress` writes when the fanout has moved on, and the alarm looks in every
 * `FANOUT_CHECK_MS` while it stays busy.
 */
export class FanoutCheckpoint {
  /** Newest seq accepted for fanout, and the seq through which all of them were handed over. */
  private accepted = 0;
  private handedOver = 0;
  /** An alarm is set for this busy spell. */
  private armed = false;
  /** What a restart lost, until resent: seqs after `after`, through `through`. */
  private lost: { after: number; through: number } | null = null;
  private readonly fresh: boolean;

  constructor(
    private readonly sql: SqlStorage,
    private readonly storage: Pick<DurableObjectStorage, "setAlarm">,
  ) {
    sql.exec("CREATE TABLE IF NOT EXISTS fanout_checkpoint (id INTEGER PRIMARY KEY CHECK (id = 0), accepted INTEGER NOT NULL, handed_over INTEGER NOT NULL)");
    const row = sql.exec<{ accepted: number; handed_over: number }>("SELECT accepted, handed_over FROM fanout_checkpoint").toArray()[0];
    this.fresh = row === undefined;
    if (row) {
      this.accepted = row.accepted;
      this.handedOver = row.handed_over;
      if (this.accepted > this.handedOver) this.lost = { after: this.handedOver, through: this.accepted };
    }
  }

  /** Event `seq` is queued for the fanout: if this object restarts before it is out, its alarm wakes it. */
  accept(seq: number): void {
    if (seq <= this.accepted) return;
    // The first event since this record began (a new object, or one from before it): nothing earlier is owed.
    if (this.fresh && this.accepted === 0) this.handedOver = seq - 1;
    this.accepted = seq;
    this.save();
    this.arm();
  }

  /** The fanout has handed over everything before `oldest` (everything, when `undefined`). */
  progress(oldest: OldestPending): void {
    if (this.lost || oldest === null) return; // what a restart lost is owed until resent
    if (oldest === undefined) this.armed = false;
    const through = oldest === undefined ? this.accepted : Math.min(this.accepted, oldest - 1);
    if (through <= this.handedOver) return;
    this.handedOver = through;
    this.save();
  }

  /**
   * After a restart, resends what the previous instance had not handed over, once. Callers
   * await this before publishing anything new, so the resent events go first.
   */
  async recover(resend: Resend): Promise<void> {
    const lost = this.lost;
    if (!lost) return;
    this.lost = null;
    try {
      await resend(lost.after, lost.through);
    } catch (error) {
      this.lost = lost; // tried again on the next call, or by the alarm
      throw error;
    } finally {
      this.arm(true);
    }
  }

  /** The alarm: resend what a restart lost; while the fanout is still busy, look in again later. */
  async alarm(resend: Resend, oldestPending: () => OldestPending): Promise<void> {
    this.armed = false;
    await this.recover(resend);
    const oldest = oldestPending();
    this.progress(oldest);
    if (oldest !== undefined) this.arm();
  }

  private arm(again = false): void {
    if (this.armed && !again) return;
    this.armed = true;
    void this.storage.setAlarm(Date.now() + FANOUT_CHECK_MS);
  }

  private save(): void {
    this.sql.exec("INSERT OR REPLACE INTO fanout_checkpoint (id, accepted, handed_over) VALUES (0, ?, ?)", this.accepted, this.handedOver);
  }
}

/** Oldest seq still queued or in flight in any of these fanouts, `undefined` when none is. */
export function oldestPending(...fanouts: Pick<Fanout<unknown>, "drained" | "pending">[]): number | undefined {
  let oldest: number | undefined;
  for (const fanout of fanouts) {
    if (fanout.drained) continue;
    for (const event of fanout.pending()) {
      const { seq } = normalize(event).message;
      if (oldest === undefined || seq < oldest) oldest = seq;
    }
  }
  return oldest;
}
