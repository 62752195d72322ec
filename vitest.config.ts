import { cloudflareTest } from "@cloudflare/vitest-plugin";
import { defineConfig } from "vitest/config";

export default defineConfig({
  test: {
    projects: [
      {
        // Runs inside workerd, against the real Durable Objects of wrangler.toml.
        plugins: [
          cloudflareTest({
            main: "./test/workers/worker.ts",
            wrangler: { configPath: "./wrangler.toml" },
            miniflare: {
              durableObjects: {
                PROBE_SENDER: "ProbeSender",
                PROBE_RECEIVER: "ProbeReceiver",
              },
            },
          }),
        ],
        test: { name: "workers", include: ["test/workers/**/*.test.ts"] },
      },
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
