/**
 * The benchmark's OTLP endpoint: counts the spans it receives and reports each count to its
 * parent over IPC. A process of its own, like a real collector, so that export round trips
 * are not stuck behind the benchmark's thousands of WebSocket clients on one event loop.
 *
 *   fork("scripts/lib/span-sink.ts") → message { port } once listening, then { spans } per export
 */
import { createServer } from "node:http";

const server = createServer((request, response) => {
  let body = "";
  request.on("data", (chunk: Buffer) => (body += chunk.toString()));
  request.on("end", () => {
    response.writeHead(200, { "content-type": "application/json" }).end("{}");
    process.send!({ spans: (body.match(/"spanId"/g) ?? []).length });
  });
});
server.listen(0, "127.0.0.1", () => {
  const address = server.address();
  process.send!({ port: typeof address === "object" && address ? address.port : 0 });
});
process.on("disconnect", () => process.exit(0));
