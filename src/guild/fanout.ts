import { AsyncLocalStorage } from "node:async_hooks";
import type { Incoming } from "../transport/index.ts";
import type { GuildEvent } from "./events.ts";

/** A send's failure that no retry can mend (the recipient has ended): it is dropped at once. */
export class RecipientGone extends Error {}

/** Consumed entries at the front of the ready list before it is compacted. */
const READY_COMPACT_AT = 1024;

/** One recipient (a session, or a relay) with the events waiting for it. */
export interface Recipient<Stub> {
  /** Session id, or relay key. */
  readonly id: string;
  readonly userId: string;
  readonly target: string;
  stub: Stub | undefined;
  queue: Incoming<GuildEvent>[];
  /** Events in the RPC in flight (empty when none). */
  batch: Incoming<GuildEvent>[];
  sending: boolean;
  waiting: boolean;
  failures: number;
}

export interface FanoutOptions<Stub> {
  /** Sends every queued event to one recipient in one RPC. */
  send(recipient: Recipient<Stub>, events: Incoming<GuildEvent>[]): Promise<void>;
  /** A recipient that kept failing is dropped; the owner forgets its subscription. Unset: never dropped, retried for ever. */
  drop?(recipient: Recipient<Stub>, error: unknown): void;
  /**
   * Called when the last RPC in flight settles and nothing is waiting for a slot or about to
   * start (a recipient waiting out a retry's backoff does not count). Must not throw.
   */
  idle?(): void;
  /** Most RPCs in flight at once, across all recipients. */
  maxInFlight: number;
  /**
   * Admission bound: `admit()` waits while more than this many events per recipient, on
   * average, are queued or in flight. Unset: no bound.
   */
  maxBacklog?: number;
  /** Attempts per batch before the recipient is dropped (if `drop` is set). */
  maxAttempts?: number;
  /** Backoff before retry n (1-based), in ms. */
  retryDelayMs?: (attempt: number) => number;
  /**
   * `naive` is the baseline the benchmark compares against, what a first version does: one
   * awaited RPC per recipient per event, all at once, no coalescing, no bound, no retry.
   */
  strategy?: "coalesce" | "naive";
}

/**
 * Delivers a guild's events to its recipients: in order per recipient, never two RPCs to the
 * same recipient at once, and whatever queues up meanwhile goes in the next RPC (coalescing),
 * so a burst of messages costs one RPC per session rather than one per message. A failing
 * recipient is retried with backoff, without holding up anyone else, and then dropped — unless
 * the owner never drops (relays).
 */
export class Fanout<Stub> {
  private readonly recipients = new Map<string, Recipient<Stub>>();
  /** Recipients with events queued, waiting for an in-flight slot. */
  private readonly ready: Recipient<Stub>[] = [];
  private readyHead = 0;
  private inFlight = 0;
  /** Events queued or in flight, over every recipient. */
  private outstanding = 0;
  /** `admit()` callers waiting for the backlog to fall, first come first served. */
  private readonly admissions: (() => void)[] = [];
  private readonly maxAttempts: number;
  private readonly retryDelayMs: (attempt: number) => number;

  /**
   * Runs a function in the async context this fanout was created in (no trace). Sends must not
   * inherit the context of whichever call scheduled them: a sampled message's span would become
   * the ambient context of every later send and continuation — measured here as a 10–20% loss
   * of throughput with tracing on, though nothing read it.
   */
  private readonly outsideCallerContext: <R>(fn: () => R) => R = AsyncLocalStorage.snapshot();

  constructor(private readonly options: FanoutOptions<Stub>) {
    this.maxAttempts = options.maxAttempts ?? 4;
    this.retryDelayMs = options.retryDelayMs ?? ((attempt) => 50 * 4 ** (attempt - 1));
  }

  get size(): number {
    return this.recipients.size;
  }

  get pendingRpcs(): number {
    return this.inFlight;
  }

  /** Anything in flight, waiting for a slot, or about to start. */
  get busy(): boolean {
    return this.inFlight > 0 || this.pumpScheduled || this.readyHead < this.ready.length;
  }

  /**
   * Nothing queued or in flight: every event published was handed over, or abandoned with its
   * recipient. (The naive baseline counts nothing: its poster awaits its sends instead.)
   */
  get drained(): boolean {
    return this.outstanding === 0;
  }

  /**
   * Resolves once the backlog is under `maxBacklog` events per recipient and every earlier
   * caller has been admitted; `undefined` when that is already so (nothing to await). The
   * owner admits a message before accepting it, so a fanout that falls behind slows its
   * senders instead of queueing without bound (the naive baseline has no bound).
   */
  admit(): Promise<void> | undefined {
    if (this.admissions.length === 0 && !this.overBacklog(1)) return undefined;
    return new Promise((resolve) => this.admissions.push(resolve));
  }

  /**
   * More than `factor` × `maxBacklog` events per recipient queued or in flight, counting
   * `reserved` ones not yet published (see `admitWaiting`).
   */
  private overBacklog(factor: number, reserved = 0): boolean {
    const { maxBacklog, strategy } = this.options;
    return maxBacklog !== undefined && strategy !== "naive" && this.outstanding + reserved > factor * maxBacklog * Math.max(1, this.recipients.size);
  }

  /** `count` events are no longer outstanding (delivered, or abandoned with their recipient). */
  private settle(count: number): void {
    this.outstanding -= count;
    this.admitWaiting();
  }

  /** Room taken by callers admitted this turn, who publish in their continuations. */
  private reserved = 0;

  /**
   * Once the backlog is back under the bound, admits waiters together — up to twice the bound —
   * so their messages share the next RPC to each recipient: a burst, not a trickle of a message
   * or two per freed slot (more, smaller RPCs). Each admitted caller reserves one event per
   * recipient, what its publish adds, until the next turn, by when it has published (or given
   * up); without that, one settle would admit every waiter, however many.
   */
  private admitWaiting(): void {
    if (this.admissions.length === 0 || this.reserved > 0 || this.overBacklog(1)) return;
    const perMessage = Math.max(1, this.recipients.size);
    while (this.admissions.length > 0 && !this.overBacklog(2, this.reserved + perMessage)) {
      this.admissions.shift()!();
      this.reserved += perMessage;
    }
    if (this.reserved === 0 || this.reservationEnds) return;
    this.reservationEnds = setTimeout(() => {
      this.reservationEnds = undefined;
      this.reserved = 0;
      this.admitWaiting();
    }, 0);
  }

  private reservationEnds: ReturnType<typeof setTimeout> | undefined;

  /** Adds or replaces a recipient. A replaced one's queue and in-flight RPC are abandoned. */
  add(id: string, userId: string, target: string, backlog: Incoming<GuildEvent>[] = []): Recipient<Stub> {
    this.abandon(this.recipients.get(id));
    const recipient: Recipient<Stub> = {
      id,
      userId,
      target,
      stub: undefined,
      queue: backlog,
      batch: [],
      sending: false,
      waiting: false,
      failures: 0,
    };
    this.recipients.set(id, recipient);
    this.outstanding += backlog.length;
    if (backlog.length > 0) this.schedule(recipient);
    return recipient;
  }

  /** A recipient leaves: its queued and in-flight events stop counting against the backlog. */
  private abandon(recipient: Recipient<Stub> | undefined): void {
    if (recipient) this.settle(recipient.queue.length + recipient.batch.length);
  }

  get(id: string): Recipient<Stub> | undefined {
    return this.recipients.get(id);
  }

  remove(id: string): Recipient<Stub> | undefined {
    const recipient = this.recipients.get(id);
    this.recipients.delete(id);
    this.abandon(recipient);
    return recipient;
  }

  clear(): void {
    this.recipients.clear();
    this.settle(this.outstanding);
  }

  /** Every event still queued or in flight, per recipient: in flight first, then queued. */
  *pending(): Iterable<Incoming<GuildEvent>> {
    for (const recipient of this.recipients.values()) yield* recipient.batch.concat(recipient.queue);
  }

  /** Every recipient of one user, e.g. to drop them when the user leaves the guild. */
  recipientsOf(userId: string): Recipient<Stub>[] {
    return [...this.recipients.values()].filter((r) => r.userId === userId);
  }

  all(): IterableIterator<Recipient<Stub>> {
    return this.recipients.values();
  }

  /**
   * Queues one event per recipient; `eventFor` decides what each one gets (bare or wrapped).
   * The naive baseline sends at once instead and returns the promise of every send settling:
   * a first version awaits its RPCs.
   */
  publish(eventFor: (recipient: Recipient<Stub>) => Incoming<GuildEvent>): Promise<void> | undefined {
    if (this.options.strategy === "naive") {
      const sends = [...this.recipients.values()].map((recipient) =>
        this.options.send(recipient, [eventFor(recipient)]).catch((error: unknown) => console.warn("naive fanout: send failed:", error)),
      );
      return Promise.all(sends).then(() => undefined);
    }
    for (const recipient of this.recipients.values()) {
      recipient.queue.push(eventFor(recipient));
      this.schedule(recipient);
    }
    this.outstanding += this.recipients.size;
    return undefined;
  }

  private isCurrent(recipient: Recipient<Stub>): boolean {
    return this.recipients.get(recipient.id) === recipient;
  }

  /**
   * Queues a recipient for a slot, first come first served. Sending starts on the next turn of
   * the event loop, not at once: messages that arrive together (other requests already waiting
   * in this object's queue) then share one RPC per recipient instead of the first going alone.
   */
  private schedule(recipient: Recipient<Stub>): void {
    if (recipient.sending || recipient.waiting || recipient.queue.length === 0) return;
    recipient.waiting = true;
    this.ready.push(recipient);
    if (!this.pumpScheduled) {
      this.pumpScheduled = true;
      setTimeout(
        () =>
          this.outsideCallerContext(() => {
            this.pumpScheduled = false;
            this.pump();
            // The last RPC may have settled while this turn was pending (it counted as busy
            // then): say so now, or spans waiting for the idle hook wait for the next message.
            if (!this.busy) this.options.idle?.();
          }),
        0,
      );
    }
  }

  private pumpScheduled = false;

  private start(recipient: Recipient<Stub>): void {
    const events = recipient.queue;
    recipient.queue = [];
    recipient.batch = events;
    recipient.sending = true;
    this.inFlight++;
    this.options.send(recipient, events).then(
      () => {
        recipient.failures = 0;
        recipient.batch = [];
        // A removed or replaced recipient's events were settled when it left.
        if (this.isCurrent(recipient)) this.settle(events.length);
        this.finish(recipient);
      },
      (error: unknown) => {
        recipient.stub = undefined; // a stub that threw is broken; the next send makes a new one
        recipient.failures++;
        if (this.options.drop && (recipient.failures >= this.maxAttempts || error instanceof RecipientGone)) {
          try {
            if (this.isCurrent(recipient)) {
              this.remove(recipient.id);
              this.options.drop(recipient, error);
            }
          } finally {
            // Even if the owner's drop threw (a storage write), the slot is freed.
            recipient.batch = [];
            this.finish(recipient);
          }
          return;
        }
        // Put the batch back in front of anything queued since, then retry after a pause;
        // the slot is freed meanwhile so others keep going.
        recipient.batch = [];
        recipient.queue = events.concat(recipient.queue);
        this.inFlight--;
        this.pump();
        if (!this.busy) this.options.idle?.();
        setTimeout(() => {
          recipient.sending = false;
          if (this.isCurrent(recipient)) this.schedule(recipient);
        }, this.retryDelayMs(recipient.failures));
      },
    ).catch((error: unknown) => console.error("fanout: an owner's hook failed after an RPC settled:", error));
  }

  private finish(recipient: Recipient<Stub>): void {
    recipient.sending = false;
    this.inFlight--;
    if (this.isCurrent(recipient)) this.schedule(recipient);
    else recipient.queue = [];
    this.pump();
    if (!this.busy) this.options.idle?.();
  }

  /** Starts waiting recipients while slots are free. */
  private pump(): void {
    while (this.inFlight < this.options.maxInFlight && this.readyHead < this.ready.length) {
      const next = this.ready[this.readyHead++]!;
      next.waiting = false;
      if (this.isCurrent(next) && !next.sending && next.queue.length > 0) this.start(next);
    }
    if (this.readyHead === this.ready.length) {
      this.ready.length = 0;
      this.readyHead = 0;
    } else if (this.readyHead >= READY_COMPACT_AT && this.readyHead * 2 >= this.ready.length) {
      // A fanout that stays saturated never empties the list: drop the consumed front now and then.
      this.ready.splice(0, this.readyHead);
      this.readyHead = 0;
    }
  }
}
