import { type Incoming, normalize } from "../transport/index.ts";
import type { GuildEvent } from "./events.ts";
import type { Fanout } from "./fanout.ts";

/** How long a fanout may stay busy before its alarm looks in on it (and, after a restart, resends). */
export const FANOUT_CHECK_MS = 5_000;

/** Most events a recovery resends: the newest ones owed; a session lacking older ones pulls them. */
export const MAX_RESEND = 32;

/** Sends events `first`..`last` again, in order, to every recipient the owner has now. */
export type Resend = (first: number, last: number) => Promise<void>;

/**
 * The oldest seq a fanout has not handed over, `undefined` when it has handed over everything,
 * `null` when it cannot tell (events in transit between objects): then it makes no progress.
 */
export type OldestPending = number | undefined | null;

/**
 * How far a guild's or relay's fanout got, kept durably, so that one restarted in the middle of
 * a fanout (a deploy, a crash: its queues lived in memory) makes up for what it had not handed
 * over. Otherwise sessions would notice the gap only when the next message came, which in a
 * quiet guild may be never.
 *
 * It resends the newest events it owes, at most `MAX_RESEND`: a session that lacks earlier ones
 * sees the gap and pulls them from the guild's log (its ordering rule), and one that has them
 * drops the repeats. So a recovery costs at most that many events per recipient, however much
 * was lost — within what admission lets a fanout hold anyway.
 *
 * Cheap on the hot path: `accept` writes one small row per call (a guild makes it with each
 * message it stores anyway, a relay once per publish); an alarm is set when this instance has
 * none pending (at most once per `FANOUT_CHECK_MS` while busy) and never deleted: a storage
 * operation per drain, which at low rates means per message, would cost more than the alarm's
 * one look at a drained fanout.
 */
export class FanoutCheckpoint {
  /** Newest seq accepted for fanout, and the seq through which all of them were handed over. */
  private accepted = 0;
  private handedOver = 0;
  /** An alarm is pending: it will look in, whatever happens before it fires. */
  private armed = false;
  /** What a restart lost (seqs `first`..`last`), until it is resent. */
  private lost: { first: number; last: number } | null = null;
  private recovering: Promise<void> | null = null;
  /** No record was stored when this object started: nothing from before its first event is owed. */
  private readonly noRecordAtStart: boolean;

  constructor(
    private readonly sql: SqlStorage,
    private readonly storage: Pick<DurableObjectStorage, "setAlarm">,
  ) {
    sql.exec("CREATE TABLE IF NOT EXISTS fanout_checkpoint (id INTEGER PRIMARY KEY CHECK (id = 0), accepted INTEGER NOT NULL, handed_over INTEGER NOT NULL)");
    const row = sql.exec<{ accepted: number; handed_over: number }>("SELECT accepted, handed_over FROM fanout_checkpoint").toArray()[0];
    this.noRecordAtStart = row === undefined;
    if (row) {
      this.accepted = row.accepted;
      this.handedOver = row.handed_over;
      if (this.accepted > this.handedOver) this.lost = { first: Math.max(this.handedOver + 1, this.accepted - MAX_RESEND + 1), last: this.accepted };
    }
  }

  /**
   * Events `first`..`last` are queued for the fanout — new ones, or older ones queued again (a
   * backlog moved here from another object): until they are out, a restart resends.
   */
  accept(first: number, last = first): void {
    if (this.noRecordAtStart && this.accepted === 0) this.handedOver = first - 1;
    let changed = false;
    if (last > this.accepted) {
      this.accepted = last;
      changed = true;
    }
    if (first <= this.handedOver) {
      this.handedOver = first - 1;
      changed = true;
    }
    if (changed) this.save();
    this.arm();
  }

  /**
   * Events may have been dropped where no progress can tell (a failed relay sync discards the
   * backlogs it was moving): owe the newest `MAX_RESEND` again, so the next recovery — the
   * next message, or the alarm — resends them; recipients drop what they already have.
   */
  resendRecent(): void {
    if (this.accepted === 0) return;
    const first = Math.max(1, this.accepted - MAX_RESEND + 1);
    this.lost = { first: Math.min(first, this.lost?.first ?? first), last: this.accepted };
    if (first - 1 < this.handedOver) {
      this.handedOver = first - 1; // owed after a restart too
      this.save();
    }
    this.arm();
  }

  /** The fanout has handed over everything before `oldest` (everything, when `undefined`). */
  progress(oldest: OldestPending): void {
    if (this.lost === null && oldest !== null) {
      const through = oldest === undefined ? this.accepted : Math.min(this.accepted, oldest - 1);
      if (through > this.handedOver) {
        this.handedOver = through;
        this.save();
      }
    }
    if (this.lost !== null || this.accepted > this.handedOver) this.arm(); // still owed: keep an alarm (no-op while one is pending)
  }

  /**
   * After a restart, resends what the previous instance owed; callers await this before
   * publishing anything new, so the resent events go first. Concurrent callers share one
   * resend; a failed one is tried again on the next call or alarm.
   */
  recover(resend: Resend): Promise<void> | undefined {
    if (this.lost === null) return undefined;
    return (this.recovering ??= this.resendLost(resend).finally(() => (this.recovering = null)));
  }

  private async resendLost(resend: Resend): Promise<void> {
    const lost = this.lost!;
    try {
      await resend(lost.first, lost.last);
      if (this.lost === lost) this.lost = null; // queued now: the fanout's own progress covers it
    } finally {
      this.arm(); // the resent events are covered, or the failed resend is tried again
    }
  }

  /** The alarm: resend what a restart lost; while the fanout is still busy, look in again later. */
  async alarm(resend: Resend, oldestPending: () => OldestPending): Promise<void> {
    this.armed = false;
    try {
      await this.recover(resend);
    } catch (error) {
      console.error("fanout checkpoint: resending after a restart failed; trying again later:", error);
      return; // the failed attempt set the next alarm
    }
    this.progress(oldestPending()); // which keeps an alarm while anything is owed
  }

  /** Keeps an alarm pending, set `FANOUT_CHECK_MS` from now unless one is (the owner's other alarm work uses it too). */
  arm(): void {
    if (this.armed) return;
    this.armed = true;
    this.storage.setAlarm(Date.now() + FANOUT_CHECK_MS).catch((error: unknown) => {
      this.armed = false; // the next event tries again
      console.error("fanout checkpoint: setting the alarm failed:", error);
    });
  }

  private save(): void {
    this.sql.exec("INSERT OR REPLACE INTO fanout_checkpoint (id, accepted, handed_over) VALUES (0, ?, ?)", this.accepted, this.handedOver);
  }
}

/**
 * Oldest seq still queued or in flight in any of these fanouts, `undefined` when none is. Looks
 * at every pending event (a moved backlog may be out of order), so it is for the alarm, not the
 * hot path.
 */
export function oldestPending(...fanouts: Pick<Fanout<unknown>, "drained" | "pending">[]): number | undefined {
  let oldest: number | undefined;
  for (const fanout of fanouts) {
    const first = fanout.drained ? undefined : seqRange(fanout.pending())?.first;
    if (first !== undefined && (oldest === undefined || first < oldest)) oldest = first;
  }
  return oldest;
}

/** Lowest and highest seq among `events`, `undefined` when there are none. */
export function seqRange(events: Iterable<Incoming<GuildEvent>>): { first: number; last: number } | undefined {
  let range: { first: number; last: number } | undefined;
  for (const event of events) {
    const { seq } = normalize(event).message;
    if (!range) range = { first: seq, last: seq };
    else if (seq < range.first) range.first = seq;
    else if (seq > range.last) range.last = seq;
  }
  return range;
}
