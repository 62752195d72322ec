import { createExecutionContext, env, waitOnExecutionContext } from "cloudflare:test";
import type { ReadableSpan } from "@opentelemetry/sdk-trace-base";
import { beforeEach, describe, expect, it } from "vitest";
import { handleRequest } from "../../src/api/routes.ts";
import { addMember, token } from "./gateway-client.ts";
import { recordedSpans } from "./tracing.ts";

const apiSpans = () => recordedSpans.getFinishedSpans().filter((span: ReadableSpan) => span.resource.attributes["service.name"] === "guildwire-api");
const sampled = (traceId: string) => `00-${traceId}-b7ad6b7169203331-01`;

/** The Worker with production's head sampling turned down to nothing, as an operator with a costly backend might. */
async function request(path: string, init: RequestInit): Promise<Response> {
  const ctx = createExecutionContext();
  const response = await handleRequest(new Request(`http://gateway.test${path}`, init), { ...env, TRACE_SAMPLE_RATE: "0" }, ctx);
  await waitOnExecutionContext(ctx);
  return response;
}

beforeEach(() => recordedSpans.reset());

describe("TRACE_SAMPLE_RATE against traceparents from anyone", () => {
  it("an anonymous request cannot force a trace (and an export) with a sampled traceparent", async () => {
    const headers = { traceparent: sampled("11111111111111111111111111111111") };
    const statuses = [
      (await request("/api/guilds/forced/messages", { method: "POST", headers, body: JSON.stringify({ content: "x" }) })).status,
      (await request("/api/guilds/forced/messages", { method: "GET", headers: { ...headers, Authorization: "Bearer not-a-token" } })).status,
      (await request("/api/no-such-route", { method: "GET", headers })).status,
    ];
    expect(statuses).toEqual([401, 401, 404]);
    expect(apiSpans().map((span) => span.name)).toEqual([]);
  });

  it("a member's post still continues a sampled trace, as the contract has it", async () => {
    await addMember("forced-member", "fm-user");
    recordedSpans.reset();
    const response = await request("/api/guilds/forced-member/messages", {
      method: "POST",
      headers: { traceparent: sampled("22222222222222222222222222222222"), Authorization: `Bearer ${await token("fm-user")}` },
      body: JSON.stringify({ content: "traced" }),
    });
    expect(response.status).toBe(201);
    expect(apiSpans().map((span) => [span.name, span.spanContext().traceId])).toEqual([["POST /api/guilds/{guild_id}/messages", "22222222222222222222222222222222"]]);
  });

});
