/**
 * A real OpenTelemetry SDK for tests: spans go to an in-memory exporter, and context follows
 * async calls through AsyncLocalStorage as it does in production.
 */
import { context, trace } from "@opentelemetry/api";
import { BasicTracerProvider, InMemorySpanExporter, SimpleSpanProcessor } from "@opentelemetry/sdk-trace-base";
import { AsyncLocalStorageContextManager } from "../../src/telemetry/context.ts";

export const recordedSpans = new InMemorySpanExporter();

let installed = false;
/** Installs the SDK once per isolate (tests and the Durable Objects they call share it). */
export function installTestTracing(): void {
  if (installed) return;
  installed = true;
  context.setGlobalContextManager(new AsyncLocalStorageContextManager());
  trace.setGlobalTracerProvider(new BasicTracerProvider({ spanProcessors: [new SimpleSpanProcessor(recordedSpans)] }));
}
