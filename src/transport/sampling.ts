/**
 * Tiered sampling by fanout size: a sampled message to few recipients keeps most of their
 * spans, a broadcast to thousands keeps a sliver — so tracing cost stays flat as guilds grow.
 */

export interface FanoutTier {
  /** Fanout size (number of recipients) this rate applies at. */
  recipients: number;
  /** Probability in [0, 1] that one recipient keeps the sampled flag. */
  rate: number;
}

export const DEFAULT_FANOUT_SAMPLING = "1:1,100:0.1,10000:0.001";

/**
 * Parses `recipients:rate` pairs, e.g. `1:1,100:0.1,10000:0.001`. Throws on anything else:
 * a typo in a sampling spec should fail a deploy, not silently trace everything or nothing.
 */
export function parseFanoutTiers(spec: string): FanoutTier[] {
  if (typeof spec !== "string" || spec.trim() === "") {
    throw new Error("fanout sampling spec is empty; expected recipients:rate pairs like 1:1,100:0.1");
  }
  const tiers = spec.split(",").map((part, index) => {
    const pair = part.trim();
    const match = /^(\d+(?:\.\d+)?)\s*:\s*(\d+(?:\.\d+)?(?:e-?\d+)?)$/i.exec(pair);
    if (!match) {
      throw new Error(`fanout sampling tier ${index + 1} is "${pair}"; expected recipients:rate, e.g. 100:0.1`);
    }
    const recipients = Number(match[1]);
    const rate = Number(match[2]);
    if (!Number.isFinite(recipients) || recipients < 1) {
      throw new Error(`fanout sampling tier "${pair}": recipients must be at least 1`);
    }
    if (!Number.isFinite(rate) || rate < 0 || rate > 1) {
      throw new Error(`fanout sampling tier "${pair}": rate must be between 0 and 1`);
    }
    return { recipients, rate };
  });
  tiers.sort((a, b) => a.recipients - b.recipients);
  for (let i = 1; i < tiers.length; i++) {
    if (tiers[i]!.recipients === tiers[i - 1]!.recipients) {
      throw new Error(`fanout sampling lists ${tiers[i]!.recipients} recipients twice`);
    }
  }
  return tiers;
}

export const DEFAULT_FANOUT_TIERS: readonly FanoutTier[] = Object.freeze(parseFanoutTiers(DEFAULT_FANOUT_SAMPLING));

/**
 * Rate for a fanout to `recipients` sessions. Below the first tier and above the last the
 * nearest tier's rate holds; between two tiers the rate is interpolated linearly in
 * log(recipients)–log(rate) (so 1:1 and 100:0.1 give 10 → 0.316). A tier with rate 0 has no
 * logarithm, so next to one the rate is interpolated linearly in log(recipients) instead.
 */
export function fanoutSampleRate(recipients: number, tiers: readonly FanoutTier[] = DEFAULT_FANOUT_TIERS): number {
  const first = tiers[0];
  if (!first) return 1;
  if (!(recipients > first.recipients)) return first.rate;
  for (let i = 1; i < tiers.length; i++) {
    const hi = tiers[i]!;
    if (recipients > hi.recipients) continue;
    const lo = tiers[i - 1]!;
    const t = Math.log(recipients / lo.recipients) / Math.log(hi.recipients / lo.recipients);
    if (lo.rate === 0 || hi.rate === 0) return lo.rate + t * (hi.rate - lo.rate);
    return Math.exp(Math.log(lo.rate) + t * Math.log(hi.rate / lo.rate));
  }
  return tiers[tiers.length - 1]!.rate;
}

/** FNV-1a over a string, continuing from `hash`. */
function fnv1a(text: string, hash: number): number {
  for (let i = 0; i < text.length; i++) {
    hash ^= text.charCodeAt(i);
    hash = Math.imul(hash, 0x01000193);
  }
  return hash;
}

/**
 * Consistent per-recipient decision: the same trace and recipient always get the same answer,
 * without randomness at call time. The hash is spread by murmur3's finalizer so that ids that
 * differ only in their last characters still land uniformly in [0, 1).
 */
export function keepSampled(traceId: string, recipientId: string, rate: number): boolean {
  if (rate >= 1) return true;
  if (!(rate > 0)) return false;
  let hash = fnv1a(recipientId, fnv1a(traceId, 0x811c9dc5) ^ 0x2f);
  hash ^= hash >>> 16;
  hash = Math.imul(hash, 0x85ebca6b);
  hash ^= hash >>> 13;
  hash = Math.imul(hash, 0xc2b2ae35);
  hash ^= hash >>> 16;
  return (hash >>> 0) / 0x100000000 < rate;
}
