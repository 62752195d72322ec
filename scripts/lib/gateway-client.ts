/** A Node client for the gateway: connects, identifies or resumes, and records every frame. */
import WebSocket from "ws";
import { Op } from "../../src/gateway/protocol.ts";

export interface Frame {
  op: number;
  d?: unknown;
  s?: number;
  t?: string;
}

export interface Closed {
  code: number;
  reason: string;
}

export class GatewayClient {
  readonly frames: Frame[] = [];
  readonly socket: WebSocket;
  closed: Closed | null = null;
  private readonly waiters = new Set<() => void>();
  private heartbeat: NodeJS.Timeout | undefined;

  private constructor(socket: WebSocket) {
    this.socket = socket;
    socket.on("message", (data, isBinary) => {
      if (isBinary) return;
      this.frames.push(JSON.parse(data.toString()) as Frame);
      this.notify();
    });
    socket.on("close", (code, reason) => {
      this.closed = { code, reason: reason.toString() };
      clearInterval(this.heartbeat);
      this.notify();
    });
    socket.on("error", () => {});
  }

  static connect(baseUrl: string): Promise<GatewayClient> {
    const socket = new WebSocket(`${baseUrl.replace(/^http/, "ws")}/gateway`);
    return new Promise((resolve, reject) => {
      socket.once("open", () => resolve(new GatewayClient(socket)));
      socket.once("error", reject);
      socket.once("unexpected-response", (_req, res) => reject(new Error(`gateway answered ${res.statusCode}`)));
    });
  }

  /** Last dispatch sequence received. */
  get seq(): number | null {
    for (let i = this.frames.length - 1; i >= 0; i--) if (this.frames[i]!.op === Op.DISPATCH) return this.frames[i]!.s!;
    return null;
  }

  dispatches(t?: string): Frame[] {
    return this.frames.filter((f) => f.op === Op.DISPATCH && (t === undefined || f.t === t));
  }

  send(frame: unknown): void {
    this.socket.send(typeof frame === "string" ? frame : JSON.stringify(frame));
  }

  /** Waits until `predicate` holds over the frames received so far (or the socket closes). */
  async waitFor<T>(predicate: () => T | undefined | null | false, timeoutMs = 10_000, what = "condition"): Promise<T> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const value = predicate();
      if (value) return value;
      if (Date.now() >= deadline) throw new Error(`timed out waiting for ${what}; frames: ${JSON.stringify(this.frames.slice(-5))}, closed: ${JSON.stringify(this.closed)}`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(done, Math.max(1, deadline - Date.now()));
        const waiters = this.waiters;
        function done() {
          clearTimeout(timer);
          waiters.delete(done);
          resolve();
        }
        waiters.add(done);
      });
    }
  }

  waitForDispatch(t: string, index = 0, timeoutMs?: number): Promise<Frame> {
    return this.waitFor(() => this.dispatches(t)[index], timeoutMs, `dispatch ${t} #${index}`);
  }

  waitForClose(timeoutMs?: number): Promise<Closed> {
    return this.waitFor(() => this.closed, timeoutMs, "close");
  }

  /** Sends IDENTIFY and waits for READY. */
  async identify(token: string): Promise<Frame> {
    await this.waitFor(() => this.frames.find((f) => f.op === Op.HELLO), 10_000, "HELLO");
    this.send({ op: Op.IDENTIFY, d: { token } });
    return this.waitForDispatch("READY");
  }

  /** Heartbeats at the interval HELLO asked for, as a well-behaved client does. */
  startHeartbeat(): void {
    const hello = this.frames.find((f) => f.op === Op.HELLO);
    const interval = (hello?.d as { heartbeat_interval: number } | undefined)?.heartbeat_interval ?? 41_250;
    this.heartbeat = setInterval(() => {
      if (this.socket.readyState === WebSocket.OPEN) this.send({ op: Op.HEARTBEAT, d: this.seq });
    }, interval);
  }

  close(code = 1000): Promise<Closed> {
    clearInterval(this.heartbeat);
    if (this.closed) return Promise.resolve(this.closed);
    this.socket.close(code);
    return this.waitForClose();
  }

  /** Drops the TCP connection without a close frame, as a lost network does. */
  drop(): void {
    clearInterval(this.heartbeat);
    this.socket.terminate();
  }

  private notify(): void {
    for (const waiter of [...this.waiters]) waiter();
  }
}
