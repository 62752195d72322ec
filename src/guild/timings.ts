/**
 * Guild timings: per minute and per action, how many and how long — cheap, always-on numbers
 * beside sampled traces. Kept in memory for the last 60 minutes.
 *
 * Durations come from Date.now(), which Workers advance only across I/O: time spent awaiting
 * storage or other objects is measured, pure CPU inside one event is not.
 */

export interface ActionTiming {
  count: number;
  totalMs: number;
  maxMs: number;
}

export interface MinuteTimings {
  minute: string;
  actions: Record<string, ActionTiming>;
}

const MINUTE_MS = 60_000;
const KEEP_MINUTES = 60;

export class Timings {
  private readonly minutes = new Map<number, Map<string, ActionTiming>>();

  record(action: string, durationMs: number, now = Date.now()): void {
    const minute = Math.floor(now / MINUTE_MS) * MINUTE_MS;
    let actions = this.minutes.get(minute);
    if (!actions) {
      actions = new Map();
      this.minutes.set(minute, actions);
      this.prune(minute);
    }
    const timing = actions.get(action);
    if (timing) {
      timing.count++;
      timing.totalMs += durationMs;
      if (durationMs > timing.maxMs) timing.maxMs = durationMs;
    } else {
      actions.set(action, { count: 1, totalMs: durationMs, maxMs: durationMs });
    }
  }

  /** Runs `fn` and records how long it took, whether it succeeded or threw. */
  async time<R>(action: string, fn: () => Promise<R> | R): Promise<R> {
    const start = Date.now();
    try {
      return await fn();
    } finally {
      this.record(action, Date.now() - start);
    }
  }

  /** Oldest first, the last 60 minutes. */
  snapshot(now = Date.now()): MinuteTimings[] {
    this.prune(Math.floor(now / MINUTE_MS) * MINUTE_MS);
    return [...this.minutes.entries()]
      .sort(([a], [b]) => a - b)
      .map(([minute, actions]) => ({
        minute: new Date(minute).toISOString(),
        actions: Object.fromEntries([...actions].map(([name, t]) => [name, { ...t }])),
      }));
  }

  private prune(currentMinute: number): void {
    const oldest = currentMinute - (KEEP_MINUTES - 1) * MINUTE_MS;
    for (const minute of this.minutes.keys()) if (minute < oldest) this.minutes.delete(minute);
  }
}
