import type { Incoming } from "../transport/index.ts";
import type { GuildEvent } from "./events.ts";

/** One recipient (a session, or a relay) with the events waiting for it. */
export interface Recipient<Stub> {
  /** Session id, or relay key. */
  readonly id: string;
  readonly userId: string;
  readonly target: string;
  stub: Stub | undefined;
  queue: Incoming<GuildEvent>[];
  sending: boolean;
  waiting: boolean;
  failures: number;
}

export interface FanoutOptions<Stub> {
  /** Sends every queued event to one recipient in one RPC. */
  send(recipient: Recipient<Stub>, events: Incoming<GuildEvent>[]): Promise<void>;
  /** A recipient that kept failing is dropped; the owner forgets its subscription. */
  drop(recipient: Recipient<Stub>, error: unknown): void;
  /** Most RPCs in flight at once, across all recipients. */
  maxInFlight: number;
  /** Attempts per batch before the recipient is dropped. */
  maxAttempts?: number;
  /** Backoff before retry n (1-based), in ms. */
  retryDelayMs?: (attempt: number) => number;
  /**
   * `naive` is the baseline the benchmark compares against, what a first version does: one RPC
   * per recipient per event, all at once, no coalescing, no bound, no retry.
   */
  strategy?: "coalesce" | "naive";
}

/**
 * Delivers a guild's events to its recipients: in order per recipient, never two RPCs to the
 * same recipient at once, and whatever queues up meanwhile goes in the next RPC (coalescing),
 * so a burst of messages costs one RPC per session rather than one per message. A failing
 * recipient is retried with backoff and then dropped without holding up anyone else.
 */
export class Fanout<Stub> {
  private readonly recipients = new Map<string, Recipient<Stub>>();
  /** Recipients with events queued, waiting for an in-flight slot. */
  private readonly ready: Recipient<Stub>[] = [];
  private readyHead = 0;
  private inFlight = 0;
  private readonly maxAttempts: number;
  private readonly retryDelayMs: (attempt: number) => number;

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

  /** Adds or replaces a recipient. A replaced one's queue and in-flight RPC are abandoned. */
  add(id: string, userId: string, target: string, backlog: Incoming<GuildEvent>[] = []): Recipient<Stub> {
    const recipient: Recipient<Stub> = {
      id,
      userId,
      target,
      stub: undefined,
      queue: backlog,
      sending: false,
      waiting: false,
      failures: 0,
    };
    this.recipients.set(id, recipient);
    if (backlog.length > 0) this.schedule(recipient);
    return recipient;
  }

  get(id: string): Recipient<Stub> | undefined {
    return this.recipients.get(id);
  }

  remove(id: string): Recipient<Stub> | undefined {
    const recipient = this.recipients.get(id);
    this.recipients.delete(id);
    return recipient;
  }

  clear(): void {
    this.recipients.clear();
  }

  /** Every recipient of one user, e.g. to drop them when the user leaves the guild. */
  recipientsOf(userId: string): Recipient<Stub>[] {
    return [...this.recipients.values()].filter((r) => r.userId === userId);
  }

  all(): IterableIterator<Recipient<Stub>> {
    return this.recipients.values();
  }

  /** Queues one event per recipient; `eventFor` decides what each one gets (bare or wrapped). */
  publish(eventFor: (recipient: Recipient<Stub>) => Incoming<GuildEvent>): void {
    if (this.options.strategy === "naive") {
      for (const recipient of this.recipients.values()) {
        this.options.send(recipient, [eventFor(recipient)]).catch((error: unknown) => console.warn("naive fanout: send failed:", error));
      }
      return;
    }
    for (const recipient of this.recipients.values()) {
      recipient.queue.push(eventFor(recipient));
      this.schedule(recipient);
    }
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
      setTimeout(() => {
        this.pumpScheduled = false;
        this.pump();
      }, 0);
    }
  }

  private pumpScheduled = false;

  private start(recipient: Recipient<Stub>): void {
    const events = recipient.queue;
    recipient.queue = [];
    recipient.sending = true;
    this.inFlight++;
    this.options.send(recipient, events).then(
      () => {
        recipient.failures = 0;
        this.finish(recipient);
      },
      (error: unknown) => {
        recipient.stub = undefined; // a stub that threw is broken; the next send makes a new one
        recipient.failures++;
        if (recipient.failures >= this.maxAttempts) {
          this.finish(recipient);
          if (this.isCurrent(recipient)) {
            this.recipients.delete(recipient.id);
            this.options.drop(recipient, error);
          }
          return;
        }
        // Put the batch back in front of anything queued since, then retry after a pause;
        // the slot is freed meanwhile so others keep going.
        recipient.queue = events.concat(recipient.queue);
        this.inFlight--;
        this.pump();
        setTimeout(() => {
          recipient.sending = false;
          if (this.isCurrent(recipient)) this.schedule(recipient);
        }, this.retryDelayMs(recipient.failures));
      },
    );
  }

  private finish(recipient: Recipient<Stub>): void {
    recipient.sending = false;
    this.inFlight--;
    if (this.isCurrent(recipient)) this.schedule(recipient);
    else recipient.queue = [];
    this.pump();
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
    }
  }
}
