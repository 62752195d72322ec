import { cloudflareTest } from "@cloudflare/vitest-plugin";
import { defineConfig } from "vitest/config";
import { DEVELOPMENT_VARS } from "./scripts/lib/dev-server.ts";

/** A project that runs inside workerd, against the real Durable Objects of wrangler.toml. */
function workersProject(name: string, options: { include?: string[]; exclude?: string[]; bindings?: Record<string, string> }) {
  return {
    plugins: [
      cloudflareTest({
        main: "./test/workers/worker.ts",
        wrangler: { configPath: "./wrangler.toml" },
        miniflare: {
          durableObjects: { PROBE_SENDER: "ProbeSender", PROBE_RECEIVER: "ProbeReceiver" },
          bindings: { ...DEVELOPMENT_VARS, ...options.bindings },
        },
      }),
    ],
    test: {
      name,
      include: options.include ?? ["test/workers/**/*.test.ts"],
      exclude: options.exclude ?? [],
      testTimeout: 30_000,
    },
  };
}

export default defineConfig({
  test: {
    projects: [
      workersProject("workers", { exclude: ["test/workers/**/*.bare.test.ts", "test/workers/**/*.relay.test.ts", "test/workers/**/*.retention.test.ts"] }),
      // The same Worker deployed with TRANSPORT_MODE=bare, as during a rollout.
      workersProject("workers-bare", { include: ["test/workers/**/*.bare.test.ts"], bindings: { TRANSPORT_MODE: "bare" } }),
      // Relays from 4 live sessions, 3 sessions per relay: small enough to test every transition.
      workersProject("workers-relay", {
        include: ["test/workers/**/*.relay.test.ts"],
        bindings: { RELAY_THRESHOLD: "4", RELAY_SIZE: "3" },
      }),
      // A guild keeps 20 messages: pruning, and sessions and members past what it pruned.
      workersProject("workers-retention", { include: ["test/workers/**/*.retention.test.ts"], bindings: { MESSAGE_RETENTION: "20" } }),
      {
        // Starts the gateway as `npm start` does and talks to it over real sockets.
        test: {
          name: "e2e",
          include: ["test/e2e/**/*.test.ts"],
          environment: "node",
          testTimeout: 60_000,
          hookTimeout: 120_000,
        },
      },
    ],
  },
});
