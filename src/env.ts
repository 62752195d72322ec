/** Bindings and variables of wrangler.toml (and .dev.vars locally). See CONTRACT.md. */
export interface Env {
  AUTH_SECRET?: string;
  ENVIRONMENT?: string;
  OTEL_EXPORTER_OTLP_ENDPOINT?: string;
  TRACE_SAMPLE_RATE?: string;
  FANOUT_SAMPLING?: string;
  TRANSPORT_MODE?: string;
}
