import { DurableObject } from "cloudflare:workers";
import { authSecret } from "../api/auth.ts";
import { verifyToken } from "../api/tokens.ts";
import type { Env } from "../env.ts";
import { parseClientFrame } from "../gateway/frames.ts";
import {
  type ClientFrame,
  CloseCode,
  DEFAULT_HEARTBEAT_INTERVAL_MS,
  type EventName,
  HEARTBEAT_TIMEOUT_FACTOR,
  Op,
  RATE_LIMIT_FRAMES,
  RATE_LIMIT_WINDOW_MS,
  RESUME_WINDOW_MS,
  type ServerFrame,
} from "../gateway/protocol.ts";
import type { DeliveryResult, GuildDelivery, GuildEvent } from "../guild/events.ts";
import { type HandleOptions, contextFromCarrier, normalize, runInSpan } from "../transport/index.ts";
import { type Telemetry, telemetryFor } from "../telemetry/index.ts";
import { type BufferedDispatch, ResumeBuffer } from "./resume-buffer.ts";

/**
 * - `connecting`: HELLO sent, waiting for IDENTIFY or RESUME.
 * - `ready`: identified (or resumed) with a socket.
 * - `disconnected`: socket gone, resumable until `resumeDeadline`, still buffering dispatches.
 * - `moved`: this object is where the session started, and it now lives in another object
 *   (`movedTo`) after a RESUME on a new connection; resumes are forwarded there.
 * - `ended`: nothing left.
 */
type Status = "connecting" | "ready" | "disconnected" | "moved" | "ended";

interface State {
  status: Status;
  /** The session id clients see: the id of the object where the session started. */
  sessionId: string;
  userId: string;
  /** Last dispatch sequence sent. */
  s: number;
  movedTo: string;
  heartbeatDeadline: number;
  /** A connection that has not identified (or resumed) by then is closed 4003, heartbeats or not. */
  identifyDeadline?: number;
  resumeDeadline: number;
  /** Guilds the session should be in whose subscribe failed: tried again from the alarm. */
  owed?: OwedGuilds;
}

/** A guild's answer to subscribing: its seq, or no. */
type SubscribeAnswer = { guildId: string; lastSeq: number } | { guildId: string; refused: true } | { guildId: string; failed: true };

interface OwedGuilds {
  guildIds: string[];
  retryAt: number;
  tries: number;
}

/** A dispatch as a hand-off carries it: with when it was first stored, so a RESUME does not make it young again. */
type HandedFrame = { s: number; frame: string; at?: number };

/** What the session's current holder hands to the object a client resumed on. */
export type HandOff =
  | { kind: "ok"; userId: string; s: number; guilds: GuildPosition[]; frames: HandedFrame[] }
  // More frames than one RPC may carry: the next of them, with nothing handed over yet. Asked
  // again with `copiedThrough`, until the rest fits in an "ok".
  | { kind: "page"; frames: HandedFrame[] }
  | { kind: "unknown" }
  | { kind: "seq_ahead" }
  | { kind: "wrong_user" };

/** A hand-off's answer once every page has come. */
type FinalHandOff = Exclude<HandOff, { kind: "page" }>;

/** How far a session has got in one guild. */
export interface GuildPosition {
  guildId: string;
  lastSeq: number;
}

export interface HandOffRequest {
  requester: string;
  userId: string;
  seq: number;
  /** The requester has the frames up to this seq already (pages): the hand-off starts after it. */
  copiedThrough?: number;
}

/**
 * Frame text one hand-off RPC carries, in UTF-16 code units: serialized, a unit takes 1 or 2
 * bytes, well inside workerd's 32 MiB for an RPC's arguments or return value. A minute of a busy
 * guild's dispatches (the resume window) can be far more than that.
 */
const HAND_OFF_PAGE_UNITS = 4 * 1024 * 1024;

const HOLDING: ReadonlySet<Status> = new Set(["ready", "disconnected"]);
const ENDS_SESSION = (code: number) => code === CloseCode.NORMAL || code === CloseCode.GOING_AWAY;
/** A guild whose subscribe failed is tried again after 1 s, then twice as long each time, up to 30 s. */
const OWED_FIRST_RETRY_MS = 1000;
const OWED_MAX_RETRY_MS = 30_000;
/** How often a session's first object, once it was resumed elsewhere, asks whether the session is still held. */
const HOLDER_CHECK_MS = 60 * 60 * 1000;

/** How a delivery ended, for the spans of its sampled events. */
interface Outcome {
  settled: Promise<void>;
  succeed(): void;
  fail(error: unknown): void;
}

function outcomeOf(): Outcome {
  let succeed!: () => void;
  let fail!: (error: unknown) => void;
  const settled = new Promise<void>((resolve, reject) => {
    succeed = resolve;
    fail = reject;
  });
  settled.catch(() => undefined); // a failure reaches the spans that wait; no one else need listen
  return { settled, succeed, fail };
}

/**
 * One gateway connection: its WebSocket (hibernation API), the Discord-style protocol, and a
 * resume buffer. Everything that must survive hibernation or eviction lives in SQLite storage;
 * memory holds only a cache of it (the frame rate counter rides with the socket).
 */
export class Session extends DurableObject<Env> {
  private readonly sql: SqlStorage;
  private resumeBuffer: ResumeBuffer | undefined;
  private state: State;
  /**
   * Work that dispatches, hands the session over or ends it runs one task at a time, so dispatch
   * order is the order of arrival and a session ends only between tasks.
   */
  private serial: Promise<unknown> = Promise.resolve();
  /** Delivery spans (only for events that arrive with a sampled carrier) and their export. */
  private readonly traced: HandleOptions;
  private readonly telemetry: Telemetry;

  constructor(ctx: DurableObjectState, env: Env) {
    super(ctx, env);
    this.telemetry = telemetryFor("guildwire-session", env);
    this.traced = this.telemetry.handleOptions;
    this.sql = ctx.storage.sql;
    // No tables are made here, only when a connection arrives (`fetch`): an ended session's
    // object is wiped, and the late calls it still gets (a delivery, an expired RESUME, the user
    // directory asking) would otherwise bring its storage back, with nothing left to delete it.
    const stored = this.sql.exec("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'state'").toArray().length > 0;
    const saved = stored ? this.sql.exec<{ data: string }>("SELECT data FROM state WHERE id = 0").toArray()[0] : undefined;
    this.state = saved
      ? (JSON.parse(saved.data) as State)
      : { status: "connecting", sessionId: "", userId: "", s: 0, movedTo: "", heartbeatDeadline: 0, resumeDeadline: 0 };
    // Dispatches do not rewrite the state row; the buffer knows the last `s` they reached.
    if (stored) this.state.s = Math.max(this.state.s, this.buffer.lastSeq());
  }

  /** The resume buffer, its tables made on first use: only a session that holds something gets there. */
  private get buffer(): ResumeBuffer {
    return (this.resumeBuffer ??= new ResumeBuffer(this.sql));
  }

  private get selfId(): string {
    return this.ctx.id.toString();
  }

  private get heartbeatInterval(): number {
    const configured = Number(this.env.HEARTBEAT_INTERVAL_MS);
    return Number.isFinite(configured) && configured >= 100 ? configured : DEFAULT_HEARTBEAT_INTERVAL_MS;
  }

  // ---- connection -------------------------------------------------------------------------

  /** The Worker forwards `GET /gateway` here, to a brand-new object. */
  override async fetch(request: Request): Promise<Response> {
    if (request.headers.get("Upgrade")?.toLowerCase() !== "websocket") {
      return new Response("expected a WebSocket upgrade", { status: 426 });
    }
    if (this.state.status !== "connecting" || this.ctx.getWebSockets().length > 0) {
      return new Response("session object already in use", { status: 409 });
    }
    this.sql.exec("CREATE TABLE IF NOT EXISTS state (id INTEGER PRIMARY KEY CHECK (id = 0), data TEXT NOT NULL)");
    const { 0: client, 1: server } = new WebSocketPair();
    this.ctx.acceptWebSocket(server);
    this.send(server, { op: Op.HELLO, d: { heartbeat_interval: this.heartbeatInterval } });
    // One deadline for the first heartbeat and for IDENTIFY/RESUME; heartbeats extend only the first.
    const deadline = Date.now() + this.heartbeatInterval * HEARTBEAT_TIMEOUT_FACTOR;
    this.setState({ heartbeatDeadline: deadline, identifyDeadline: deadline });
    this.scheduleAlarm();
    return new Response(null, { status: 101, webSocket: client });
  }

  override async webSocketMessage(ws: WebSocket, data: string | ArrayBuffer): Promise<void> {
    // Frames still on their way when this side closed the socket (and perhaps wiped this
    // object) are discarded, as RFC 6455 has it once a Close is sent. (Frames the client sent
    // before closing it itself are still handled.)
    const notes = socketNotes(ws);
    if (notes.closedHere || this.state.status === "ended") return;
    if (!withinRateLimit(ws, notes)) return this.close(ws, CloseCode.RATE_LIMITED, "too many frames");
    const parsed = parseClientFrame(data);
    const authenticated = HOLDING.has(this.state.status);
    if (!parsed.ok) {
      if (parsed.serverOnly && !authenticated) return this.close(ws, CloseCode.NOT_AUTHENTICATED, "identify first");
      return this.close(ws, parsed.code, parsed.reason);
    }
    const frame: ClientFrame = parsed.frame;
    switch (frame.op) {
      case Op.HEARTBEAT:
        // Kept with the socket, not in storage: a stored write and an alarm per heartbeat would
        // be most of what a quiet connection costs. The alarm catches up when it comes due.
        ws.serializeAttachment({ ...socketNotes(ws), heartbeatDeadline: Date.now() + this.heartbeatInterval * HEARTBEAT_TIMEOUT_FACTOR });
        return this.send(ws, { op: Op.HEARTBEAT_ACK, d: null }); // every frame has its `d` (CONTRACT.md), as Discord's ACK does
      case Op.IDENTIFY:
      case Op.RESUME: {
        if (authenticated || this.handshaking) return this.close(ws, CloseCode.ALREADY_AUTHENTICATED, "already authenticated");
        this.handshaking = true;
        try {
          await (frame.op === Op.IDENTIFY ? this.identify(ws, frame.d.token) : this.resume(ws, frame.d));
        } finally {
          this.handshaking = false;
          const code = this.closedWhileHandshaking;
          this.closedWhileHandshaking = undefined;
          // A client that closed during IDENTIFY never saw READY (it is the last thing sent), so
          // has no session id to resume with: whatever the code, the session ends.
          if (code !== undefined) await this.disconnected(frame.op === Op.IDENTIFY ? CloseCode.NORMAL : code);
        }
      }
    }
  }

  /** An IDENTIFY or RESUME is being processed; a second one is refused. */
  private handshaking = false;
  /**
   * The socket closed while an IDENTIFY or RESUME was being processed. Handled once it is done,
   * so a session it subscribed (or took over) is ended or left resumable like any other, rather
   * than wiped while subscriptions are still being made for it.
   */
  private closedWhileHandshaking: number | undefined;

  override async webSocketClose(ws: WebSocket, code: number, reason: string): Promise<void> {
    // Complete the closing handshake now (echoing the client's code, as RFC 6455 suggests), so
    // the client is not left waiting on whatever the session does next.
    closeSocket(ws, code === 1005 || code === 1006 || code === 1015 ? CloseCode.NORMAL : code, reason);
    await this.disconnected(code);
  }

  override async webSocketError(): Promise<void> {
    await this.disconnected(CloseCode.UNKNOWN_ERROR);
  }

  /**
   * Heartbeat deadline while connected, resume deadline while disconnected; owed guilds' retry;
   * where the session started and was resumed elsewhere, whether its holder still holds it.
   */
  override async alarm(): Promise<void> {
    const now = Date.now();
    const { status, owed } = this.state;
    if (status === "moved") return this.enqueue(() => this.checkHolder());
    if ((status === "connecting" || status === "ready") && now >= this.heartbeatDeadline()) {
      const ws = this.socket();
      if (ws) return this.close(ws, CloseCode.SESSION_TIMED_OUT, "no heartbeat received in time");
      return this.disconnected(CloseCode.SESSION_TIMED_OUT);
    }
    if (status === "connecting" && !this.handshaking && now >= (this.state.identifyDeadline ?? Infinity)) {
      // Heartbeats alone do not keep an anonymous connection (and its object) alive.
      const ws = this.socket();
      if (ws) return this.close(ws, CloseCode.NOT_AUTHENTICATED, "identify or resume in time");
      return this.disconnected(CloseCode.NOT_AUTHENTICATED);
    }
    if (status === "disconnected" && now >= this.state.resumeDeadline) {
      // After any task in progress, and only if no RESUME took the session meanwhile.
      return this.enqueue(() => (this.state.status === "disconnected" ? this.end() : undefined));
    }
    if (owed && HOLDING.has(status) && now >= owed.retryAt) {
      // Not awaited: a slow guild must not keep this alarm from coming back for the deadlines
      // (the runtime runs one alarm at a time). The retry settles `retryAt`; until then, this one.
      this.setState({ owed: { ...owed, retryAt: now + OWED_MAX_RETRY_MS } });
      this.ctx.waitUntil(this.enqueue(() => this.joinOwed()).catch((error: unknown) => console.error("session: retrying owed guilds failed:", error)));
    }
    this.scheduleAlarm();
  }

  // ---- identify and resume ------------------------------------------------------------------

  private async authenticate(ws: WebSocket, token: string): Promise<string | null> {
    const secret = authSecret(this.env);
    const claims = secret ? await verifyToken(secret, token) : null;
    if (!claims) {
      this.close(ws, CloseCode.AUTHENTICATION_FAILED, secret ? "invalid token" : "server has no AUTH_SECRET");
      return null;
    }
    return claims.sub;
  }

  private async identify(ws: WebSocket, token: string): Promise<void> {
    const userId = await this.authenticate(ws, token);
    if (!userId) return;
    let tooMany = false;
    try {
      await this.enqueue(async () => {
        this.setState({ status: "ready", sessionId: this.selfId, userId });
        const guildIds = await this.user(userId).attachSession(this.selfId, this.selfId, false);
        if (guildIds === null) {
          tooMany = true;
          return;
        }
        // A guild that cannot be reached now is left out and announced with GUILD_CREATE once
        // it can be (Discord's unavailable guilds), rather than keeping the user out of the rest.
        const subscribed = await this.settle(await this.requestSubscriptions(guildIds), { announce: false });
        this.dispatch("READY", { session_id: this.selfId, user_id: userId, guilds: subscribed });
      });
    } catch (error) {
      // The client never got READY (so no session id to resume): undo what was set up, and
      // say so with a close it can act on, rather than leave it waiting.
      console.error("IDENTIFY failed:", error);
      closeSocket(ws, CloseCode.UNKNOWN_ERROR, "the session could not be started; identify again");
      await this.enqueue(() => this.end());
      return;
    }
    if (tooMany) {
      closeSocket(ws, CloseCode.RATE_LIMITED, "too many sessions or identifies for this user; resume, or end one and wait");
      await this.enqueue(() => this.end());
    }
  }

  private async resume(ws: WebSocket, request: { token: string; session_id: string; seq: number }): Promise<void> {
    const userId = await this.authenticate(ws, request.token);
    if (!userId) return;
    const origin = this.sessionStub(request.session_id);
    if (!origin || request.session_id === this.selfId) return this.send(ws, { op: Op.INVALID_SESSION, d: false });
    // Asked before the hand-off, so a refused RESUME leaves the session where it was, resumable.
    // (A user directory that cannot be asked, or of a version without the method, lets it go ahead.)
    if (!(await this.user(userId).allowResume().catch(() => true))) {
      return this.close(ws, CloseCode.RATE_LIMITED, "resuming too often for this user; wait a second and resume again");
    }
    let handOff: FinalHandOff;
    try {
      handOff = await this.requestHandOff(origin, { requester: this.selfId, userId, seq: request.seq }, ws);
    } catch (error) {
      // Not "unknown": the session may well be intact (its object resetting for a deploy, just
      // as its clients resume), and op 9 would have the client start over and miss what was
      // posted meanwhile. Had the hand-off gone through, the next RESUME gets op 9 anyway.
      console.warn("resume: the session's object could not be reached:", error);
      return this.askToResume(ws, "the session could not be reached; resume again");
    }
    if (handOff.kind === "seq_ahead") return this.close(ws, CloseCode.INVALID_SEQ, "seq is ahead of the session");
    if (handOff.kind === "wrong_user") return this.close(ws, CloseCode.AUTHENTICATION_FAILED, "session belongs to another user");
    if (handOff.kind === "unknown") return this.send(ws, { op: Op.INVALID_SESSION, d: false });
    const { frames, guilds, s } = handOff;
    try {
      await this.enqueue(async () => {
        this.buffer.takeHandedOver(frames);
        this.setState({ status: "ready", sessionId: request.session_id, userId, s });
        for (const { guildId, lastSeq } of guilds) this.setGuildSeq(guildId, lastSeq);
        // Already in the buffer: if the client dropped meanwhile, its next RESUME gets them.
        if (ws.readyState === WebSocket.READY_STATE_OPEN) for (const { frame } of frames) ws.send(frame);
        const memberOf = (await this.user(userId).attachSession(request.session_id, this.selfId, true)) ?? [];
        // Each guild re-targets its deliveries here and replays what came after `lastSeq`, or
        // says the user was removed meanwhile. Guilds joined meanwhile are caught up on too: the
        // user directory's notices during the hand-off went to the previous holder.
        await this.join(guilds.map(({ guildId }) => guildId));
        await this.join(memberOf.filter((guildId) => !guilds.some((position) => position.guildId === guildId)));
        this.dispatch("RESUMED", null);
      });
    } catch (error) {
      // The session is held here now: the client may RESUME again (handled once this is done).
      console.error("RESUME failed:", error);
      await this.askToResume(ws, "the session could not be resumed here; resume again");
    }
  }

  /**
   * Asks the session's holder (through `origin`) for the session, a page at a time while its
   * frames are more than one RPC may carry; the holder changes nothing until the last, so a
   * failure on the way leaves the session there, resumable. Each page is stored, and sent to
   * the client, as it comes: neither side holds the whole buffer in memory.
   */
  private async requestHandOff(origin: DurableObjectStub<Session>, request: HandOffRequest, ws: WebSocket): Promise<FinalHandOff> {
    this.buffer.clear();
    for (;;) {
      const handOff = await origin.takeOver(request);
      if (handOff.kind !== "page") return handOff;
      const copiedThrough = handOff.frames.at(-1)?.s ?? 0;
      if (copiedThrough <= (request.copiedThrough ?? request.seq)) throw new Error("a hand-off page brought nothing new");
      this.buffer.takeHandedOver(handOff.frames);
      if (ws.readyState === WebSocket.READY_STATE_OPEN) for (const { frame } of handOff.frames) ws.send(frame);
      request = { ...request, copiedThrough };
    }
  }

  /** Called on the object where a session started, by the object a client resumes on. */
  async takeOver(request: HandOffRequest): Promise<HandOff> {
    if (this.state.status !== "moved") return this.handOff(request);
    // A task, so that two RESUMEs at once and the pointer's check take turns: one asking the
    // holder while another's hand-off is on its way back would find no one there. (`release` is
    // not one: the holder calls it from a task of its own, which a hand-off here may wait behind.)
    return this.enqueue(async (): Promise<HandOff> => {
      if (this.state.status !== "moved") return { kind: "unknown" }; // released meanwhile
      const holder = this.sessionStub(this.state.movedTo);
      const handOff = holder ? await holder.handOff(request) : ({ kind: "unknown" } as const);
      if (this.state.status !== "moved") return handOff; // released while asking: nothing to point to
      if (handOff.kind === "ok") this.setState({ movedTo: request.requester });
      // "unknown" also answers a seq older than the holder keeps: the pointer goes only with the session.
      if (handOff.kind === "unknown") await this.checkHolder();
      return handOff;
    });
  }

  /**
   * The pointer kept where a session started goes when no one holds the session any more. Its
   * last holder says so (`release`) as it ends, but that call can be lost (a reset while the
   * holder ended), so the pointer also asks, now and then; an unreachable holder may still hold
   * it. Runs as a task.
   */
  private async checkHolder(): Promise<void> {
    if (this.state.status !== "moved") return; // released meanwhile
    const holder = this.sessionStub(this.state.movedTo);
    const held = holder ? await holder.isHeld().catch(() => true) : false;
    if (this.state.status !== "moved") return; // released while asking
    if (!held) return this.wipe();
    this.scheduleAlarm();
  }

  /** Gives the session (state, guild positions, unacknowledged dispatches) to `requester`. */
  async handOff(request: HandOffRequest): Promise<HandOff> {
    return this.enqueue(() => {
      this.flushDispatches(); // anything numbered but not yet stored (a failed flush) goes with the session
      const { status, userId, s, sessionId } = this.state;
      if (!HOLDING.has(status)) return { kind: "unknown" };
      if (request.userId !== userId) return { kind: "wrong_user" };
      if (request.seq > s) return { kind: "seq_ahead" };
      const after = Math.max(request.seq, request.copiedThrough ?? 0);
      const oldest = this.buffer.oldestSeq();
      if (after < s && (oldest === null || oldest > after + 1)) return { kind: "unknown" };
      const { frames, more } = this.buffer.agedFramesAfter(after, HAND_OFF_PAGE_UNITS);
      if (more) return { kind: "page", frames };
      const handOff: HandOff = { kind: "ok", userId, s, guilds: this.guildSeqs(), frames };
      const ws = this.socket();
      if (ws) closeSocket(ws, CloseCode.UNKNOWN_ERROR, "session resumed on another connection");
      if (sessionId === this.selfId) {
        // Where the session started: keep a pointer so later resumes find it.
        this.buffer.clear();
        this.positions = null;
        this.setState({ status: "moved", movedTo: request.requester, owed: undefined }); // the new holder subscribes them
        this.scheduleAlarm(); // to ask, now and then, whether the session is still held
      } else {
        this.wipe();
      }
      return handOff;
    });
  }

  /** For the user directory: is a session held here (connected, or resumable)? */
  async isHeld(): Promise<boolean> {
    // Mid-RESUME, the hand-off may have come already: the pointer where the session started must not go.
    return HOLDING.has(this.state.status) || this.handshaking;
  }

  /** The session's last holder ended it: the pointer kept here is no longer needed. */
  async release(): Promise<void> {
    if (this.state.status === "moved") this.wipe();
  }

  // ---- deliveries from guilds and the user directory ---------------------------------------

  async deliver(delivery: GuildDelivery): Promise<DeliveryResult | undefined> {
    let gone: boolean;
    try {
      gone = await this.enqueue(() => this.deliverNow(delivery));
    } catch (error) {
      // A failed delivery's spans are the ones an operator most wants, and no result carries
      // them back: sent from here.
      this.telemetry.exportPending(this.ctx);
      throw error;
    }
    if (gone) return { gone: true };
    // Delivery spans: handed back for the caller to export with other sessions', or sent from here.
    if (!delivery.returnSpans) {
      this.telemetry.exportPending(this.ctx);
      return undefined;
    }
    const spans = this.telemetry.takeSpans();
    return spans && { spans };
  }

  /** Stores and sends a guild's events, as a task; answers whether the session has ended. */
  private async deliverNow(delivery: GuildDelivery): Promise<boolean> {
    if (!HOLDING.has(this.state.status)) return this.gone;
    let lastSeq = this.guildSeq(delivery.guildId);
    if (lastSeq === undefined) return false; // left the guild: a late delivery, the guild has stopped its own
    // A sampled event's span ends with the whole delivery — stored and sent, or failed — so
    // tracing adds no write of its own: the batch is one row whether or not events are sampled.
    let delivered: Outcome | undefined;
    const spans: Promise<unknown>[] = [];
    try {
      try {
        for (const incoming of delivery.events) {
          const { message: event, carrier } = normalize(incoming);
          // A repeat (a retried RPC's, or one a gap fill brought already) delivers nothing.
          if (event.seq <= lastSeq) continue;
          const after = lastSeq;
          const parent = contextFromCarrier(carrier);
          let next!: number | Promise<number>;
          if (parent) {
            const outcome = (delivered ??= outcomeOf()).settled;
            // runInSpan calls this at once, so `next` is set before it is read below.
            const span = runInSpan(parent, "session.deliver", this.traced, () => {
              next = this.dispatchAfter(delivery.guildId, after, event);
              return typeof next === "number" ? outcome : next.then(() => outcome);
            });
            spans.push(span.catch(() => undefined)); // the span records a failure; it is thrown below
          } else {
            next = this.dispatchAfter(delivery.guildId, after, event);
          }
          const reached = typeof next === "number" ? next : await next;
          // Left out (the guild would not fill the gap before it): so would the rest be.
          if (reached < event.seq) break;
          lastSeq = reached;
        }
      } finally {
        // Stored and sent even if a gap fill failed part-way: what was numbered has moved the
        // session's `s` and position, and a RESUME hands over only what is stored.
        this.flushDispatches(); // the buffer's runs record the new position
      }
      delivered?.succeed();
    } catch (error) {
      delivered?.fail(error);
      await Promise.all(spans); // each ends with the failure (and never rejects)
      throw error;
    }
    if (spans.length > 0) await Promise.all(spans);
    return false;
  }

  /** The user joined a guild. Answers `gone` if the session has ended, so the user directory forgets it. */
  async guildAdded(guildId: string): Promise<{ gone?: true }> {
    // Subscribed already, as far as it knows? A removal it never heard of may have ended the
    // subscription, so `join` subscribes again from where it got to (no GUILD_CREATE then).
    return this.whileHolding(() => this.join([guildId]));
  }

  /** The user left a guild. Answers `gone` if the session has ended, as `guildAdded` does. */
  async guildRemoved(guildId: string): Promise<{ gone?: true }> {
    // The guild has the last word: a removal notice can arrive after a later re-add's.
    return this.whileHolding(() => this.join([guildId]));
  }

  /** Runs `task` in the queue if the session is held here; answers `gone` if it has ended. */
  private whileHolding(task: () => void | Promise<void>): Promise<{ gone?: true }> {
    return this.enqueue(async () => {
      if (!HOLDING.has(this.state.status)) return this.gone ? { gone: true } : {};
      await task();
      return {};
    });
  }

  /**
   * A guild stopped delivering here after deliveries kept failing: subscribe again from where
   * the session got to (pulling what it missed), or leave the guild if no longer a member.
   */
  async guildDropped(guildId: string): Promise<void> {
    await this.enqueue(async () => {
      if (HOLDING.has(this.state.status) && this.guildSeq(guildId) !== undefined) await this.join([guildId]);
    });
  }

  /**
   * Subscribes to guilds, as a task: one the session is in already again from where it got to
   * (pulling what it missed), a new one from now, announced with GUILD_CREATE. A guild that says
   * the user is no longer a member is left; one that cannot be reached is owed (`settle`).
   */
  private async join(guildIds: string[]): Promise<void> {
    await this.settle(await this.requestSubscriptions(guildIds), { announce: true });
  }

  /**
   * The alarm's retry of owed guilds, as a task: asked and answered in one turn of the queue, so
   * no hand-off, removal or ending can come between (a slow guild holds up this session's other
   * work while it answers, as at IDENTIFY).
   */
  private async joinOwed(): Promise<void> {
    const { status, owed } = this.state;
    if (HOLDING.has(status) && owed) await this.join(owed.guildIds);
  }

  /**
   * Nothing lives here: the session ended (or never started), or it moved to another object.
   * Whoever asks (a guild, a relay, the user directory) still lists this object as the session's
   * target, and forgets only that pairing: a holder that took the session over has re-targeted
   * it already, or will when it subscribes. Answering "alive" from a moved object would keep
   * a session whose hand-off never completed (the new holder reset, or its answer lost)
   * delivered to for ever.
   */
  private get gone(): boolean {
    return this.state.status === "ended" || this.state.status === "connecting" || this.state.status === "moved";
  }

  /**
   * The user was removed from the guild: first show what was posted while they were still a
   * member and has not arrived yet (the guild keeps that readable for a while: a 201 given
   * before the removal is not taken back), then GUILD_DELETE.
   */
  private async leaveRemoved(guildId: string): Promise<void> {
    const lastSeq = this.guildSeq(guildId);
    if (lastSeq === undefined) return this.leaveGuild(guildId);
    try {
      await this.fillGap(guildId, lastSeq, Number.MAX_SAFE_INTEGER);
    } catch (error) {
      console.warn(`session: catching up on guild ${guildId} before leaving it failed:`, error);
    }
    this.leaveGuild(guildId);
  }

  /** No longer a member: forget the guild and tell the client, if it was subscribed. */
  private leaveGuild(guildId: string): void {
    if (this.state.owed?.guildIds.includes(guildId)) this.settleOwed([guildId], []);
    if (this.guildSeq(guildId) === undefined) return;
    this.deleteGuild(guildId);
    this.dispatch("GUILD_DELETE", { id: guildId });
  }

  // ---- internals ----------------------------------------------------------------------------

  private enqueue<R>(task: () => R | Promise<R>): Promise<R> {
    const run = this.serial.then(task);
    this.serial = run.catch((error: unknown) => console.error("session task failed:", error));
    return run;
  }

  /** Asks each guild to deliver here, after the session's position there if it has one. */
  private requestSubscriptions(guildIds: string[]): Promise<SubscribeAnswer[]> {
    const { sessionId, userId } = this.state;
    return Promise.all(
      guildIds.map(async (guildId): Promise<SubscribeAnswer> => {
        const after = this.guildSeq(guildId);
        try {
          const result = await this.guild(guildId).subscribe({ sessionId, userId, target: this.selfId, ...(after === undefined ? {} : { after }) });
          return result.ok ? { guildId, lastSeq: result.value.lastSeq } : { guildId, refused: true };
        } catch (error) {
          console.warn(`session: guild ${guildId} could not be subscribed; trying again later:`, error);
          return { guildId, failed: true };
        }
      }),
    );
  }

  /**
   * Applies guilds' answers to subscribing, in the task that asked; returns
   * the guilds subscribed. A new guild starts at the guild's seq, announced with GUILD_CREATE if
   * `announce` (READY lists them instead); one the session is in pulls what it missed. A guild
   * that refused (not a member) is left. One that failed (or whose gap could not be filled) does
   * not fail the others: it is owed, and tried again from the alarm until it answers — so one
   * broken guild neither keeps a user from connecting nor makes the user directory give up on a
   * live session.
   */
  private async settle(answers: SubscribeAnswer[], options: { announce: boolean }): Promise<string[]> {
    const outcomes = await Promise.all(
      answers.map(async (answer) => {
        if ("failed" in answer || "refused" in answer) return answer;
        const { guildId, lastSeq } = answer;
        try {
          const position = this.guildSeq(guildId);
          if (position === undefined) {
            this.setGuildSeq(guildId, lastSeq);
            if (options.announce) this.dispatch("GUILD_CREATE", { id: guildId });
          } else if (lastSeq > position) {
            this.setGuildSeq(guildId, await this.fillGap(guildId, position, lastSeq + 1));
          }
          return answer;
        } catch (error) {
          console.warn(`session: catching up on guild ${guildId} failed; trying again later:`, error);
          return { guildId, failed: true as const };
        }
      }),
    );
    const having = (kind: "lastSeq" | "refused" | "failed") => outcomes.filter((outcome) => kind in outcome).map(({ guildId }) => guildId);
    const [subscribed, refused] = [having("lastSeq"), having("refused")];
    this.settleOwed([...subscribed, ...refused], having("failed"));
    for (const guildId of refused) await this.leaveRemoved(guildId);
    return subscribed;
  }

  /** Takes `answered` guilds off the owed list and puts `failed` ones on it, backing off while any fail. */
  private settleOwed(answered: string[], failed: string[]): void {
    const before = this.state.owed;
    const guildIds = new Set(before?.guildIds);
    for (const guildId of answered) guildIds.delete(guildId);
    for (const guildId of failed) guildIds.add(guildId);
    if (guildIds.size === 0) {
      if (before) this.setState({ owed: undefined });
      return;
    }
    if (failed.length === 0 && guildIds.size === before?.guildIds.length) return;
    const tries = failed.length > 0 ? (before?.tries ?? 0) + 1 : (before?.tries ?? 0);
    const retryAt = failed.length > 0 ? Date.now() + Math.min(OWED_FIRST_RETRY_MS * 2 ** (tries - 1), OWED_MAX_RETRY_MS) : before!.retryAt;
    this.setState({ owed: { guildIds: [...guildIds], retryAt, tries } });
    this.scheduleAlarm();
  }

  /**
   * Pulls the events between `lastSeq` and `nextSeq` that never arrived; returns the new last seq.
   * A guild's log has no holes but what it pruned (MESSAGE_RETENTION): events that no longer
   * exist are skipped, or the session would wait for them for good.
   */
  private async fillGap(guildId: string, lastSeq: number, nextSeq: number): Promise<number> {
    try {
      while (lastSeq + 1 < nextSeq) {
        const missing = await this.guild(guildId).eventsAfter(this.state.sessionId, lastSeq, nextSeq - lastSeq - 1, this.state.userId);
        if (missing.length === 0) break; // the guild has nothing more for us (e.g. we were unsubscribed)
        const before = lastSeq;
        const first = Math.min(missing[0]!.seq, nextSeq);
        if (first > lastSeq + 1) {
          console.warn(`session ${this.state.sessionId}: guild ${guildId} no longer keeps events ${lastSeq + 1}..${first - 1}; going on after them`);
          lastSeq = first - 1;
        }
        for (const event of missing) {
          if (event.seq !== lastSeq + 1 || event.seq >= nextSeq) break;
          this.dispatchEvent(guildId, event);
          lastSeq = event.seq;
        }
        if (lastSeq === before) break; // nothing it sent could follow (never expected: a guild sends in order)
      }
    } finally {
      this.flushDispatches(); // what was pulled before a failure, too
    }
    return lastSeq;
  }

  /**
   * Dispatches `event`, after pulling any events between `after` and it that never arrived;
   * returns the session's position in the guild afterwards.
   */
  private dispatchAfter(guildId: string, after: number, event: GuildEvent): number | Promise<number> {
    if (event.seq <= after + 1) {
      this.dispatchEvent(guildId, event);
      return event.seq;
    }
    return this.fillGap(guildId, after, event.seq).then((reached) => {
      // The guild gave less than the gap (it no longer lists this session): dispatching `event`
      // would skip what is missing for good. Left out; subscribing again pulls from `reached`.
      if (reached + 1 !== event.seq) return reached;
      this.dispatchEvent(guildId, event);
      return event.seq;
    });
  }

  /** Dispatches a guild's event; its run in the buffer records the session's new position there. */
  private dispatchEvent(guildId: string, event: GuildEvent): void {
    this.queueDispatch(event.type, event.data, guildId, event.seq);
    this.guildPositions().set(guildId, event.seq);
  }

  private dispatch(t: EventName, d: unknown): void {
    this.queueDispatch(t, JSON.stringify(d));
    this.flushDispatches();
  }

  /** Numbers a dispatch; `flushDispatches` stores it in the resume buffer, then sends it. */
  private queueDispatch(t: EventName, dataJson: string, guildId?: string, guildSeq?: number): void {
    const s = this.state.s + 1;
    this.state.s = s; // persisted through the resume buffer: see the constructor
    this.unsent.push({ s, frame: `{"op":${Op.DISPATCH},"t":"${t}","s":${s},"d":${dataJson}}`, guildId, guildSeq });
  }

  /** Dispatches numbered but not yet stored and sent. Stored first, so a sent one is resumable. */
  private unsent: BufferedDispatch[] = [];

  private flushDispatches(): void {
    if (this.unsent.length === 0) return;
    const frames = this.unsent;
    this.buffer.append(frames); // if this throws, the frames stay queued for the next flush
    this.unsent = [];
    const ws = this.state.status === "ready" ? this.socket() : undefined;
    if (ws) for (const { frame } of frames) ws.send(frame);
  }

  /** A frame outside the resume buffer (HELLO, ACK, op 9), to a socket that is still open. */
  private send(ws: WebSocket, frame: ServerFrame): void {
    if (ws.readyState === WebSocket.READY_STATE_OPEN) ws.send(JSON.stringify(frame));
  }

  private close(ws: WebSocket, code: CloseCode, reason: string): Promise<void> {
    closeSocket(ws, code, reason);
    return this.disconnected(code);
  }

  /**
   * A failure on the server's side that leaves the session resumable: op 7 says "reconnect and
   * RESUME" in the protocol's own words, and the close (4000, not 1000) keeps the session.
   */
  private askToResume(ws: WebSocket, reason: string): Promise<void> {
    this.send(ws, { op: Op.RECONNECT, d: null });
    return this.close(ws, CloseCode.UNKNOWN_ERROR, reason);
  }

  /**
   * The socket closed. Runs after any task in progress (a delivery, a guild joined), so the
   * session ends knowing every guild it subscribed to; during an IDENTIFY or RESUME, after it.
   */
  private async disconnected(code: number): Promise<void> {
    if (this.handshaking) {
      this.closedWhileHandshaking ??= code;
      return;
    }
    await this.enqueue(() => {
      const { status } = this.state;
      if (status === "connecting") return this.wipe();
      if (status !== "ready") return;
      if (ENDS_SESSION(code)) return this.end();
      this.setState({ status: "disconnected", resumeDeadline: Date.now() + RESUME_WINDOW_MS });
      this.scheduleAlarm();
    });
  }

  /** The session is over: leave every guild and the user directory, then forget everything. Runs as a task. */
  private async end(): Promise<void> {
    const { sessionId, userId, owed } = this.state;
    // Owed guilds too: a subscribe that failed on its way back may have taken effect.
    const guildIds = new Set([...this.guildSeqs().map((position) => position.guildId), ...(owed?.guildIds ?? [])]);
    const ws = this.socket();
    if (ws) closeSocket(ws, CloseCode.NORMAL, "session ended");
    // Forgotten before the calls, not after: a reset while they wait (a slow guild, a deploy)
    // would leave the storage behind for good. Whoever misses a call here learns the session is
    // gone from its next call to this object.
    this.wipe();
    await Promise.allSettled([
      ...[...guildIds].map((id) => this.guild(id).unsubscribe(sessionId)),
      this.user(userId).detachSession(sessionId),
      ...(sessionId !== this.selfId ? [this.sessionStub(sessionId)?.release()] : []),
    ]);
  }

  private wipe(): void {
    this.state = { ...this.state, status: "ended" };
    // Nothing of it may be written back into the deleted storage (a later hand-off flushes first).
    this.unsent = [];
    this.positions = null;
    this.resumeBuffer = undefined;
    void this.ctx.storage.deleteAlarm();
    void this.ctx.storage.deleteAll();
  }

  /** The stored deadline (set at connect), or the socket's, once a heartbeat has moved it on. */
  private heartbeatDeadline(): number {
    const ws = this.socket();
    return Math.max(this.state.heartbeatDeadline, (ws && socketNotes(ws).heartbeatDeadline) || 0);
  }

  private scheduleAlarm(): void {
    const { status, resumeDeadline, owed } = this.state;
    const heartbeatDeadline = status === "connecting" || status === "ready" ? this.heartbeatDeadline() : 0;
    const deadline =
      status === "disconnected"
        ? resumeDeadline
        : status === "connecting"
          ? Math.min(heartbeatDeadline, this.handshaking ? Infinity : (this.state.identifyDeadline ?? Infinity))
          : status === "ready"
            ? heartbeatDeadline
            : status === "moved"
              ? Date.now() + HOLDER_CHECK_MS
              : 0;
    const at = owed && HOLDING.has(status) ? Math.min(owed.retryAt, deadline || Infinity) : deadline;
    if (at > 0) void this.ctx.storage.setAlarm(at);
  }

  private setState(patch: Partial<State>): void {
    this.state = { ...this.state, ...patch };
    // `s` as far as the resume buffer has it: a dispatch numbered but not stored yet (a delivery
    // waiting on a gap fill while the alarm writes) would, after a reset, leave a hole in `s`.
    const stored = this.unsent.length === 0 ? this.state : { ...this.state, s: this.unsent[0]!.s - 1 };
    this.sql.exec("INSERT OR REPLACE INTO state (id, data) VALUES (0, ?)", JSON.stringify(stored));
  }

  /** Last seq dispatched per subscribed guild: a cache of the resume buffer's positions. */
  private positions: Map<string, number> | null = null;

  private guildPositions(): Map<string, number> {
    return (this.positions ??= this.buffer.positions());
  }

  private guildSeq(guildId: string): number | undefined {
    return this.guildPositions().get(guildId);
  }

  /** Subscribes at `lastSeq`, or moves there other than by dispatching (which records it itself). */
  private setGuildSeq(guildId: string, lastSeq: number): void {
    if (this.guildSeq(guildId) === lastSeq) return;
    this.guildPositions().set(guildId, lastSeq);
    this.buffer.setPosition(guildId, lastSeq);
  }

  private deleteGuild(guildId: string): void {
    this.guildPositions().delete(guildId);
    this.buffer.deletePosition(guildId);
  }

  private guildSeqs(): GuildPosition[] {
    return Array.from(this.guildPositions(), ([guildId, lastSeq]) => ({ guildId, lastSeq }));
  }

  /** Looked up once per wake-up (hibernation drops this cache). */
  private cachedSocket: WebSocket | undefined;

  /** The connection's open socket: one being closed takes no more frames (they stay buffered for RESUME). */
  private socket(): WebSocket | undefined {
    if (this.cachedSocket?.readyState !== WebSocket.READY_STATE_OPEN) {
      this.cachedSocket = this.ctx.getWebSockets().find((ws) => ws.readyState === WebSocket.READY_STATE_OPEN);
    }
    return this.cachedSocket;
  }

  private guild(guildId: string) {
    return this.env.GUILD.get(this.env.GUILD.idFromName(guildId));
  }

  private user(userId: string) {
    return this.env.USER.get(this.env.USER.idFromName(userId));
  }

  private sessionStub(id: string) {
    try {
      return this.env.SESSION.get(this.env.SESSION.idFromString(id));
    } catch {
      return null; // not an id this namespace could have made
    }
  }
}

/**
 * Kept with the socket (its attachment), so hibernation forgets none of them: the frames the
 * client sent in the current rate-limit window, whether this side has closed it, and when it
 * times out without another heartbeat.
 */
interface SocketNotes {
  windowStart: number;
  frames: number;
  closedHere?: true;
  heartbeatDeadline?: number;
}

function socketNotes(ws: WebSocket): SocketNotes {
  return (ws.deserializeAttachment() as SocketNotes | null) ?? { windowStart: 0, frames: 0 };
}

function withinRateLimit(ws: WebSocket, notes: SocketNotes): boolean {
  const now = Date.now();
  const frames = now - notes.windowStart >= RATE_LIMIT_WINDOW_MS ? 1 : notes.frames + 1;
  ws.serializeAttachment({ ...notes, windowStart: frames === 1 ? now : notes.windowStart, frames });
  return frames <= RATE_LIMIT_FRAMES;
}

function closeSocket(ws: WebSocket, code: number, reason: string): void {
  try {
    ws.serializeAttachment({ ...socketNotes(ws), closedHere: true });
  } catch {
    // a socket this runtime no longer tracks: nothing more will arrive on it
  }
  try {
    ws.close(code, fitCloseReason(reason));
  } catch {
    // already closing
  }
}

/** A close frame's reason holds at most 123 UTF-8 bytes; `close()` throws on a longer one. */
const MAX_CLOSE_REASON_BYTES = 123;
const utf8 = new TextEncoder();

function fitCloseReason(reason: string): string {
  if (reason.length * 3 <= MAX_CLOSE_REASON_BYTES || utf8.encode(reason).byteLength <= MAX_CLOSE_REASON_BYTES) return reason;
  let bytes = 0;
  let end = 0;
  for (const char of reason) {
    bytes += utf8.encode(char).byteLength;
    if (bytes > MAX_CLOSE_REASON_BYTES - 3) return `${reason.slice(0, end)}…`; // "…" is 3 bytes
    end += char.length;
  }
  return reason;
}
