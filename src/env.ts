import type { BroadcastRoom } from "./bench/broadcast-room.ts";
import type { Guild } from "./guild/guild.ts";
import type { Relay } from "./guild/relay.ts";
import type { User } from "./guild/user.ts";
import type { Session } from "./session/session.ts";

/** Bindings and variables of wrangler.toml (and .dev.vars locally). See CONTRACT.md. */
export interface Env {
  GUILD: DurableObjectNamespace<Guild>;
  SESSION: DurableObjectNamespace<Session>;
  USER: DurableObjectNamespace<User>;
  RELAY: DurableObjectNamespace<Relay>;
  /** Benchmark reference only (development). */
  BROADCAST_ROOM: DurableObjectNamespace<BroadcastRoom>;
  AUTH_SECRET?: string;
  ENVIRONMENT?: string;
  OTEL_EXPORTER_OTLP_ENDPOINT?: string;
  /** `name=value,…` sent with every span export (a backend's API key): a secret. */
  OTEL_EXPORTER_OTLP_HEADERS?: string;
  /** How long one span export may take in all, in ms (default 10000). */
  OTEL_EXPORTER_OTLP_TIMEOUT?: string;
  TRACE_SAMPLE_RATE?: string;
  FANOUT_SAMPLING?: string;
  TRANSPORT_MODE?: string;
  /** Heartbeat interval sent in HELLO, in ms (default 41250); short values make timeouts testable. */
  HEARTBEAT_INTERVAL_MS?: string;
  /** Live sessions at which a guild starts fanning out through relays (default 1000). */
  RELAY_THRESHOLD?: string;
  /** Sessions per relay (default 1000). */
  RELAY_SIZE?: string;
  /** RPCs in flight at once per guild or relay (default 64). */
  FANOUT_MAX_IN_FLIGHT?: string;
  /** Events per recipient, on average, queued or in flight beyond which new messages wait. */
  FANOUT_MAX_BACKLOG?: string;
  /** Messages a guild keeps in its log and history (default 100000); older ones are pruned. */
  MESSAGE_RETENTION?: string;
  /** `coalesce` (default) or `naive`: the benchmark's one-RPC-per-message baseline. */
  FANOUT_STRATEGY?: string;
}

export const isDevelopment = (env: Pick<Env, "ENVIRONMENT">): boolean => env.ENVIRONMENT === "development";

/** A positive integer setting; unset or empty means `fallback`, anything else fails loudly. */
export function positiveIntegerVar(name: string, value: string | undefined, fallback: number): number {
  if (value === undefined || value === "") return fallback;
  const parsed = Number(value);
  if (!Number.isSafeInteger(parsed) || parsed < 1) throw new Error(`${name} is "${value}"; expected a positive integer`);
  return parsed;
}
