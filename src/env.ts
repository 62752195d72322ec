import type { Guild } from "./guild/guild.ts";
import type { User } from "./guild/user.ts";
import type { Session } from "./session/session.ts";

/** Bindings and variables of wrangler.toml (and .dev.vars locally). See CONTRACT.md. */
export interface Env {
  GUILD: DurableObjectNamespace<Guild>;
  SESSION: DurableObjectNamespace<Session>;
  USER: DurableObjectNamespace<User>;
  AUTH_SECRET?: string;
  ENVIRONMENT?: string;
  OTEL_EXPORTER_OTLP_ENDPOINT?: string;
  TRACE_SAMPLE_RATE?: string;
  FANOUT_SAMPLING?: string;
  TRANSPORT_MODE?: string;
  /** Heartbeat interval sent in HELLO, in ms (default 41250); short values make timeouts testable. */
  HEARTBEAT_INTERVAL_MS?: string;
}

export const isDevelopment = (env: Pick<Env, "ENVIRONMENT">): boolean => env.ENVIRONMENT === "development";
