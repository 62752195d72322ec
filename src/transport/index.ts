/**
 * The Transport: trace context carried inside messages between Durable Objects, only when
 * sampled. Depends on @opentelemetry/api only; knows nothing of guilds or sessions.
 */
export {
  type Traceparent,
  parseTraceparent,
  isSampledTraceparent,
  isValidTraceparent,
  formatTraceparent,
} from "./traceparent.ts";
export {
  type FanoutTier,
  DEFAULT_FANOUT_SAMPLING,
  DEFAULT_FANOUT_TIERS,
  parseFanoutTiers,
  fanoutSampleRate,
  keepSampled,
} from "./sampling.ts";
export {
  type Carrier,
  TRACESTATE_MAX_MEMBERS,
  TRACESTATE_MAX_LENGTH,
  sanitizeCarrier,
  sanitizeTracestate,
  isSampledCarrier,
  sampledSpanContext,
  currentCarrier,
  carrierFor,
} from "./carrier.ts";
export {
  type Envelope,
  type Incoming,
  type Received,
  type TransportMode,
  type WrapOptions,
  ENVELOPE_BRAND,
  parseTransportMode,
  wrap,
  isEnvelope,
  normalize,
} from "./envelope.ts";
export {
  type Receiver,
  type CastOptions,
  type HandleOptions,
  call,
  cast,
  handle,
  runInSpan,
  contextFromCarrier,
} from "./rpc.ts";
