// crealia.js: the browser client of a crealia server (docs/protocol.md; its API is §9).
//
// One ES module, no dependencies, no build step:
//
//   import { connect } from "/crealia.js";
//   const c = connect({ url: `ws://${location.host}/ws`, token, projectId: "p1" });
//   c.subscribe((state) => render(state));
//   await c.sendTimelineChanges([{ op: "set", element_id: "clip-1", prop: "start", value: 4 }]);
//
// `connect` returns at once; the client connects in the background, reconnects with jittered
// exponential backoff, resumes from the last durable `seq` it applied (so it misses nothing and
// applies nothing twice), and resends every change not yet acknowledged with its `change_id`.
// `state` is a new frozen object after every change, never mutated.

/** @typedef {import("./crealia.d.ts").State} State */

export const PROTOCOL = "crealia.v1";

/** The quality ladder of live sessions (docs/protocol.md §8). */
export const QUALITY_LADDER = Object.freeze({
  "360p": Object.freeze({ width: 640, height: 360, maxBitrateKbps: 800 }),
  "480p": Object.freeze({ width: 854, height: 480, maxBitrateKbps: 1200 }),
  "720p": Object.freeze({ width: 1280, height: 720, maxBitrateKbps: 2500 }),
  "1080p": Object.freeze({ width: 1920, height: 1080, maxBitrateKbps: 4500 }),
});

/** Close codes after which reconnecting cannot help: the status becomes "error". */
const FATAL_CLOSES = new Set([4400, 4401]);
/** Error codes after which a change is resent later rather than given up. */
const RETRIED_ERRORS = new Set(["rate_limited", "overloaded", "internal"]);
/** How many settled conflicts `state.resolvedConflicts` keeps, newest first. */
const RESOLVED_KEPT = 50;

/** An error the server answered (`code`: bad_request, forbidden, ...; see §7). */
export class CrealiaError extends Error {
  /**
   * @param {string} code
   * @param {string} message
   * @param {number|null} [retryAfterMs]
   */
  constructor(code, message, retryAfterMs = null) {
    super(message);
    this.name = "CrealiaError";
    this.code = code;
    this.retryAfterMs = retryAfterMs;
  }
}

/**
 * Connect to a crealia server. Returns at once; the client connects in the background.
 * @param {import("./crealia.d.ts").ConnectOptions} options
 * @returns {Client}
 */
export function connect(options) {
  return new Client(options);
}

function emptyDocument(projectId) {
  return freeze({ project_id: projectId, seq: 0, elements: {}, versions: {}, comments: [] });
}

function freeze(value) {
  return Object.freeze(value);
}

function uuid() {
  if (globalThis.crypto?.randomUUID) return crypto.randomUUID();
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function clone(value) {
  return value === undefined ? undefined : structuredClone(value);
}

export class Client {
  /** @param {import("./crealia.d.ts").ConnectOptions} options */
  constructor({
    url,
    token,
    projectId,
    reconnect = true,
    minBackoffMs = 250,
    maxBackoffMs = 10000,
    pingIntervalMs = 10000,
    metrics = "auto",
    WebSocket: Socket = globalThis.WebSocket,
  }) {
    if (!url || !token || !projectId) throw new TypeError("connect: url, token and projectId are required");
    this.url = url;
    this.token = token;
    this.projectId = projectId;
    this.options = { reconnect, minBackoffMs, maxBackoffMs, pingIntervalMs, metrics };
    this._Socket = Socket;
    /** @type {State} */
    this._state = freeze({
      isConnected: false,
      connectionStatus: "connecting",
      latency: null,
      lastMessage: null,
      users: freeze([]),
      conflicts: freeze([]),
      resolvedConflicts: freeze([]),
      document: emptyDocument(projectId),
      performanceMetrics: null,
      alerts: freeze([]),
      securityAlerts: freeze([]),
      liveSessions: freeze([]),
      user: null,
      sessionId: null,
      epoch: null,
      error: null,
    });
    this._listeners = new Set();
    this._handlers = new Map();
    this._ws = null;
    this._nextRef = 1;
    this._replies = new Map(); // ref -> {resolve, reject}
    this._changes = new Map(); // change_id -> {ops, resolve, reject, inFlight}
    this._comments = new Map(); // comment id -> {comment, resolve, reject, inFlight}
    this._tombstones = new Map(); // element id -> {type, props}: for resolutions that restore
    this._live = new Map(); // session id -> LiveSession this client takes part in
    this._attempt = 0;
    this._closed = false;
    this._timers = new Set();
    this._cursor = null;
    this._cursorFrame = null;
    this._welcome = null; // a welcome waiting for its chunks
    this._open();
  }

  /** The current state: a new frozen object after every change. */
  get state() {
    return this._state;
  }

  /**
   * Call `listener(state)` after every change of state.
   * @returns {() => void} unsubscribe
   */
  subscribe(listener) {
    this._listeners.add(listener);
    return () => this._listeners.delete(listener);
  }

  /**
   * Call `handler(data, envelope)` for every server push of `type` ("*": every push).
   * @returns {() => void} to stop
   */
  on(type, handler) {
    if (!this._handlers.has(type)) this._handlers.set(type, new Set());
    this._handlers.get(type).add(handler);
    return () => this._handlers.get(type)?.delete(handler);
  }

  /** Close the connection for good: pending requests reject, live sessions end. */
  close() {
    if (this._closed) return;
    this._closed = true;
    for (const timer of this._timers) clearTimeout(timer);
    this._timers.clear();
    clearInterval(this._pingTimer);
    if (this._cursorFrame !== null) cancelAnimationFrame(this._cursorFrame);
    for (const session of this._live.values()) session._end("closed");
    const gone = new CrealiaError("closed", "the client was closed");
    for (const pending of [...this._replies.values(), ...this._changes.values(), ...this._comments.values()]) {
      pending.reject(gone);
    }
    this._replies.clear();
    this._changes.clear();
    this._comments.clear();
    if (this._ws) this._ws.close(1000, "client closed");
    this._set({ isConnected: false, connectionStatus: "disconnected" });
  }

  // -- presence ---------------------------------------------------------------------------

  /** Send the cursor; calls within one animation frame send only the latest. */
  updateCursor(position) {
    this._cursor = { ...position };
    if (this._cursorFrame !== null) return;
    const schedule = globalThis.requestAnimationFrame ?? ((fn) => setTimeout(fn, 16));
    this._cursorFrame = schedule(() => {
      this._cursorFrame = null;
      const cursor = this._cursor;
      this._cursor = null;
      if (cursor) this._send("cursor_update", { position: cursor });
    });
  }

  /** Tell the others which element this user works on (`null`: none). */
  setActiveElement(elementId, elementType = "clip") {
    this._send("element_active", { element_id: elementId ?? null, element_type: elementType });
  }

  startTyping(elementId) {
    this._send("typing_start", elementId == null ? {} : { element_id: elementId });
  }

  stopTyping(elementId) {
    this._send("typing_stop", elementId == null ? {} : { element_id: elementId });
  }

  // -- durable changes --------------------------------------------------------------------

  /**
   * Send timeline operations (§5). Resolves with the ack's data once the change is durable,
   * resending it with the same `change_id` after every reconnect until then.
   * @param {object[]} ops
   * @param {{changeId?: string}} [options]
   */
  sendTimelineChanges(ops, { changeId } = {}) {
    const change_id = changeId ?? uuid();
    const existing = this._changes.get(change_id);
    if (existing) return existing.promise;
    const entry = { ops: clone(ops), inFlight: false };
    entry.promise = new Promise((resolve, reject) => Object.assign(entry, { resolve, reject }));
    this._changes.set(change_id, entry);
    this._sendChange(change_id);
    return entry.promise;
  }

  /**
   * Add a comment (pinned to an element and/or a time). Resolves with the ack's data; resent
   * after a reconnect with the same id (the server keeps comments idempotent on their id).
   */
  addComment({ text, element_id, time, id } = {}) {
    const comment = { id: id ?? uuid(), text };
    if (element_id != null) comment.element_id = element_id;
    if (time != null) comment.time = time;
    const entry = { comment, inFlight: false };
    entry.promise = new Promise((resolve, reject) => Object.assign(entry, { resolve, reject }));
    this._comments.set(comment.id, entry);
    this._sendComment(comment.id);
    return entry.promise;
  }

  /** Settle a pending conflict: `choice` "current", "incoming" or "custom" (with `value`). */
  resolveConflict(conflictId, choice, value) {
    const data = { conflict_id: conflictId, choice };
    if (value !== undefined) data.value = value;
    return this.request("conflict_resolve", data);
  }

  /** Settle a pending conflict keeping the current value. */
  dismissConflict(conflictId) {
    return this.request("conflict_dismiss", { conflict_id: conflictId });
  }

  /**
   * Undo a settled conflict's resolution: a new change restoring `side`'s value ("current" or
   * "incoming"; by default the side the resolution did not choose, required after a custom one).
   * Resolves with the ack's data, like a change's (`status` "conflict" when the property was
   * written since and the revert became a new conflict). Members get it as a timeline_change.
   */
  revertConflict(conflictId, side) {
    const data = { conflict_id: conflictId };
    if (side != null) data.side = side;
    return this.request("conflict_revert", data);
  }

  /** Dry-run `ops`: what would apply and conflict, and what each strategy would do. */
  previewChanges(ops) {
    return this.request("conflict_preview", { changes: ops });
  }

  /** Ask for the full `users` list now. */
  requestUsers() {
    return this.request("users_request", {}).then((data) => {
      this._users(data.users ?? []);
      return this._state.users;
    });
  }

  /**
   * Send any client message with a `ref` and resolve with its reply's data (reject with a
   * CrealiaError). Rejects at once while disconnected.
   */
  request(type, data = {}) {
    const ws = this._ws;
    if (!ws || ws.readyState !== 1 || !this._state.isConnected) {
      return Promise.reject(new CrealiaError("disconnected", `not connected: ${type} was not sent`));
    }
    const ref = this._nextRef++;
    return new Promise((resolve, reject) => {
      this._replies.set(ref, { resolve, reject });
      ws.send(JSON.stringify({ type, ref, data }));
    });
  }

  // -- live sessions ----------------------------------------------------------------------

  /**
   * Go live with the camera (`kind: "camera"`) or a screen (`"screen"`), in `mode` "p2p" (the
   * browser sends to each viewer) or "relay" (to the server, which serves the viewers).
   * @returns {Promise<LiveSession>}
   */
  async startLiveSession({ kind = "camera", mode = "p2p", audio = kind === "camera", stream } = {}) {
    const media =
      stream ??
      (kind === "screen"
        ? await navigator.mediaDevices.getDisplayMedia({ video: true, audio: false })
        : await navigator.mediaDevices.getUserMedia({ video: true, audio }));
    let ack;
    try {
      ack = await this.request("live_start", { kind, mode });
    } catch (error) {
      if (!stream) media.getTracks().forEach((track) => track.stop());
      throw error;
    }
    const session = new LiveSession(this, { ...ack, host: this._state.user?.id, isHost: true }, media);
    this._live.set(session.id, session);
    this._upsertLive({ session_id: ack.session_id, host: this._state.user?.id, kind, mode, viewers: [] });
    if (mode === "relay") await session._offerTo("server");
    return session;
  }

  /**
   * Watch a live session of this project.
   * @returns {Promise<LiveSession>}
   */
  async joinLiveSession(sessionId) {
    const existing = this._live.get(sessionId);
    if (existing && !existing.isHost) return existing;
    const ack = await this.request("live_join", { session_id: sessionId });
    const session = new LiveSession(this, { ...ack, isHost: false }, null);
    this._live.set(session.id, session);
    this._upsertLive({ session_id: sessionId, host: ack.host, kind: ack.kind, mode: ack.mode, viewers: ack.viewers });
    await session._offerTo(ack.mode === "relay" ? "server" : ack.host);
    return session;
  }

  // -- internals: the connection ----------------------------------------------------------

  _set(patch) {
    this._state = freeze({ ...this._state, ...patch });
    for (const listener of [...this._listeners]) {
      try {
        listener(this._state);
      } catch (error) {
        console.error("crealia: a state listener failed", error);
      }
    }
  }

  _emit(type, data, envelope) {
    for (const key of [type, "*"]) {
      for (const handler of [...(this._handlers.get(key) ?? [])]) {
        try {
          handler(data, envelope);
        } catch (error) {
          console.error(`crealia: a handler of ${key} failed`, error);
        }
      }
    }
  }

  _later(fn, ms) {
    const timer = setTimeout(() => {
      this._timers.delete(timer);
      fn();
    }, ms);
    this._timers.add(timer);
  }

  _open() {
    if (this._closed) return;
    this._set({ connectionStatus: "connecting", isConnected: false });
    let ws;
    try {
      ws = new this._Socket(this.url, [PROTOCOL]);
    } catch (error) {
      this._set({ connectionStatus: "error", error: String(error) });
      return;
    }
    this._ws = ws;
    ws.onopen = () => this._hello(ws);
    ws.onmessage = (event) => this._receive(ws, event.data);
    ws.onclose = (event) => this._closedBy(ws, event.code, event.reason);
    ws.onerror = () => {}; // the close that follows says what happened
  }

  _hello(ws) {
    const doc = this._state.document;
    const data = { token: this.token, project_id: this.projectId };
    if (this._state.epoch !== null) data.resume = { seq: doc.seq, epoch: this._state.epoch };
    this._helloRef = this._nextRef++;
    ws.send(JSON.stringify({ type: "hello", ref: this._helloRef, data }));
  }

  _closedBy(ws, code, reason) {
    if (ws !== this._ws) return;
    this._ws = null;
    clearInterval(this._pingTimer);
    this._welcome = null;
    const lost = new CrealiaError("disconnected", `connection closed (${code}${reason ? ": " + reason : ""})`);
    for (const pending of this._replies.values()) pending.reject(lost);
    this._replies.clear();
    for (const entry of [...this._changes.values(), ...this._comments.values()]) entry.inFlight = false;
    // A closed connection ends every live session this client was in (§8).
    for (const session of this._live.values()) session._end("disconnected");
    this._live.clear();
    if (this._closed) return;
    if (FATAL_CLOSES.has(code) || !this.options.reconnect) {
      const status = FATAL_CLOSES.has(code) ? "error" : "disconnected";
      this._set({ isConnected: false, connectionStatus: status, error: reason || `closed with ${code}`, liveSessions: freeze([]) });
      return;
    }
    this._set({ isConnected: false, connectionStatus: "disconnected", liveSessions: freeze([]) });
    const { minBackoffMs, maxBackoffMs } = this.options;
    const ceiling = Math.min(maxBackoffMs, minBackoffMs * 2 ** this._attempt);
    this._attempt += 1;
    const delay = code === 4429 ? maxBackoffMs : ceiling / 2 + Math.random() * (ceiling / 2);
    this._later(() => this._open(), delay);
  }

  _receive(ws, text) {
    if (ws !== this._ws) return;
    let parsed;
    try {
      parsed = JSON.parse(text);
    } catch {
      console.error("crealia: the server sent a frame that is not JSON");
      return;
    }
    this._lastMessage = new Date();
    for (const envelope of Array.isArray(parsed) ? parsed : [parsed]) {
      try {
        this._dispatch(envelope);
      } catch (error) {
        console.error(`crealia: could not apply ${envelope?.type}`, error);
      }
    }
    if (this._state.lastMessage !== this._lastMessage) this._set({ lastMessage: this._lastMessage });
  }

  _dispatch(envelope) {
    const { type, ref, data = {} } = envelope ?? {};
    if (this._welcome && type === "welcome_chunk") return this._chunk(data);
    if (ref !== undefined && ref === this._helloRef) {
      if (type === "welcome") return this._welcomed(data);
      if (type === "error") this._set({ error: data.message });
      return;
    }
    if (ref !== undefined && this._replies.has(ref)) {
      const pending = this._replies.get(ref);
      this._replies.delete(ref);
      if (type === "error") pending.reject(new CrealiaError(data.code, data.message, data.retry_after_ms ?? null));
      else pending.resolve(data);
      return;
    }
    switch (type) {
      case "collaboration_event":
        this._event(data);
        break;
      case "users_list":
        this._users(data.users ?? []);
        break;
      case "conflict_detected":
        this._detected(data.conflicts ?? []);
        break;
      case "conflict_resolved":
        this._resolved(data);
        break;
      case "pong":
        if (typeof data.t === "number") this._set({ latency: Math.max(0, performance.now() - data.t) });
        break;
      case "metrics_sample":
        if (data.projectId === null || data.projectId === undefined || data.projectId === this.projectId) {
          this._set({ performanceMetrics: freeze(data) });
        }
        break;
      case "alert":
        this._set({ alerts: freeze(upsertBy(this._state.alerts, "id", data).slice(0, 100)) });
        break;
      case "security_alert":
        this._set({ securityAlerts: freeze(upsertBy(this._state.securityAlerts, "id", data).slice(0, 100)) });
        break;
      case "webrtc_signal":
        this._live.get(data.session_id)?._signal(data);
        break;
      case "quality_change":
        this._live.get(data.session_id)?._quality(data);
        break;
      default:
        break;
    }
    this._emit(type, data, envelope);
  }

  _welcomed(data) {
    if (data.welcome_chunks) {
      this._welcome = { data, parts: [], count: data.welcome_chunks };
      return;
    }
    this._attempt = 0;
    const doc = data.snapshot ? snapshotDocument(data.snapshot, this._state.document) : this._state.document;
    if (data.snapshot) this._tombstones.clear();
    this._set({
      isConnected: true,
      connectionStatus: "connected",
      error: null,
      user: freeze(data.user),
      sessionId: data.session_id,
      epoch: data.epoch ?? null,
      document: doc,
      users: freeze((data.users ?? []).map(freezeUser)),
      conflicts: freeze((data.pending_conflicts ?? []).map(freeze)),
      liveSessions: freeze((data.live_sessions ?? []).map(freeze)),
    });
    this._emit("welcome", data, { type: "welcome", data });
    this._ping();
    clearInterval(this._pingTimer);
    this._pingTimer = setInterval(() => this._ping(), this.options.pingIntervalMs);
    const owner = data.user?.role === "owner";
    if (this.options.metrics === true || (this.options.metrics === "auto" && owner)) {
      this.request("metrics_subscribe", {}).catch(() => {});
    }
    for (const id of this._changes.keys()) this._sendChange(id);
    for (const id of this._comments.keys()) this._sendComment(id);
  }

  _chunk(data) {
    const welcome = this._welcome;
    welcome.parts[data.index] = data.data;
    if (welcome.parts.filter((part) => part !== undefined).length < welcome.count) return;
    this._welcome = null;
    const moved = JSON.parse(welcome.parts.join(""));
    const whole = { ...welcome.data, ...moved };
    delete whole.welcome_chunks;
    this._welcomed(whole);
  }

  _ping() {
    this._send("ping", { t: performance.now() });
  }

  /** Send a message with no reply wanted (presence, ping). Dropped while disconnected. */
  _send(type, data) {
    const ws = this._ws;
    if (!ws || ws.readyState !== 1 || !this._state.isConnected) return false;
    ws.send(JSON.stringify({ type, data }));
    return true;
  }

  _sendChange(changeId) {
    const entry = this._changes.get(changeId);
    if (!entry || entry.inFlight || !this._state.isConnected) return;
    entry.inFlight = true;
    this.request("timeline_change", { change_id: changeId, changes: entry.ops }).then(
      (ack) => {
        this._changes.delete(changeId);
        entry.resolve(ack);
      },
      (error) => this._failed(this._changes, changeId, entry, error, () => this._sendChange(changeId)),
    );
  }

  _sendComment(commentId) {
    const entry = this._comments.get(commentId);
    if (!entry || entry.inFlight || !this._state.isConnected) return;
    entry.inFlight = true;
    this.request("comment_add", { comment: entry.comment }).then(
      (ack) => {
        this._comments.delete(commentId);
        entry.resolve(ack);
      },
      (error) => this._failed(this._comments, commentId, entry, error, () => this._sendComment(commentId)),
    );
  }

  _failed(table, key, entry, error, resend) {
    entry.inFlight = false;
    if (error.code === "disconnected") return; // resent after the reconnect
    if (RETRIED_ERRORS.has(error.code) && !this._closed) {
      const wait = error.retryAfterMs ?? 1000;
      this._later(resend, Math.max(50, wait) * (1 + Math.random() * 0.2));
      return;
    }
    table.delete(key);
    entry.reject(error);
  }

  // -- internals: applying what the server says -------------------------------------------

  _users(list) {
    this._set({ users: freeze(list.map(freezeUser)) });
  }

  _event(event) {
    const { kind, user_id: userId, seq, payload = {} } = event;
    if (typeof seq === "number") {
      const doc = this._state.document;
      if (seq <= doc.seq) return; // already applied (a replay overlapping what we hold)
      if (seq > doc.seq + 1 && doc.seq > 0) {
        // A gap: something was missed. Reconnect and resume from what we hold.
        console.warn(`crealia: expected seq ${doc.seq + 1}, got ${seq}: resuming`);
        this._ws?.close(4000, "resuming after a gap");
        return;
      }
      if (kind === "timeline_change") this._apply(payload.changes ?? [], seq);
      else if (kind === "comment_add") this._comment(payload.comment, userId, event.at, seq);
      else this._setSeq(seq);
      return;
    }
    switch (kind) {
      case "user_joined":
        if (!this._state.users.some((u) => u.user_id === userId)) {
          const user = { user_id: userId, name: payload.name ?? userId, role: payload.role ?? "viewer", connections: 1, cursor: null, active_element: null, typing: null };
          this._set({ users: freeze([...this._state.users, freezeUser(user)]) });
        }
        this.requestUsers().catch(() => {});
        break;
      case "user_left":
        this._set({ users: freeze(this._state.users.filter((u) => u.user_id !== userId)) });
        break;
      case "cursor_update":
        this._presence(userId, { cursor: payload.position ?? null });
        break;
      case "element_active":
        this._presence(userId, { active_element: payload.element_id == null ? null : { element_id: payload.element_id, element_type: payload.element_type } });
        break;
      case "typing_start":
        this._presence(userId, { typing: payload.element_id ?? true });
        break;
      case "typing_stop":
        this._presence(userId, { typing: null });
        break;
      case "live_started":
        this._upsertLive({ ...payload, viewers: [], started_at: event.at });
        break;
      case "live_joined":
      case "live_left": {
        const current = this._state.liveSessions.find((s) => s.session_id === payload.session_id);
        if (current) {
          const viewers = new Set(current.viewers ?? []);
          if (kind === "live_joined") viewers.add(payload.user_id);
          else viewers.delete(payload.user_id);
          this._upsertLive({ ...current, viewers: [...viewers] });
        }
        this._live.get(payload.session_id)?._membership(kind, payload.user_id);
        break;
      }
      case "live_ended":
        this._set({ liveSessions: freeze(this._state.liveSessions.filter((s) => s.session_id !== payload.session_id)) });
        this._live.get(payload.session_id)?._end(payload.reason ?? "stopped");
        this._live.delete(payload.session_id);
        break;
      default:
        break;
    }
  }

  _presence(userId, patch) {
    if (!this._state.users.some((u) => u.user_id === userId)) return;
    this._set({ users: freeze(this._state.users.map((u) => (u.user_id === userId ? freezeUser({ ...u, ...patch }) : u))) });
  }

  _upsertLive(session) {
    this._set({ liveSessions: freeze(upsertBy(this._state.liveSessions, "session_id", session, false)) });
  }

  _setSeq(seq) {
    this._set({ document: freeze({ ...this._state.document, seq }) });
  }

  /** Apply operations (as the server applied them) at `seq`. */
  _apply(ops, seq) {
    const doc = this._state.document;
    const elements = { ...doc.elements };
    const versions = { ...doc.versions };
    for (const op of ops) {
      const id = op.element_id;
      if (op.op === "insert") {
        const props = clone(op.props ?? {});
        elements[id] = freeze({ type: op.element_type, props: freeze(props) });
        versions[id] = freeze(Object.fromEntries(Object.keys(props).map((k) => [k, seq])));
        this._tombstones.delete(id);
      } else if (op.op === "set") {
        const element = elements[id];
        if (!element) continue;
        elements[id] = freeze({ ...element, props: freeze({ ...element.props, [op.prop]: clone(op.value) }) });
        versions[id] = freeze({ ...versions[id], [op.prop]: seq });
      } else if (op.op === "delete") {
        if (elements[id]) this._tombstones.set(id, elements[id]);
        delete elements[id];
        delete versions[id];
      }
    }
    this._set({ document: freeze({ ...doc, seq, elements: freeze(elements), versions: freeze(versions) }) });
  }

  _comment(comment, userId, at, seq) {
    const doc = this._state.document;
    const entry = freeze({ ...comment, user_id: userId, at, seq });
    this._set({ document: freeze({ ...doc, seq, comments: freeze([...doc.comments, entry]) }) });
  }

  _detected(conflicts) {
    let pending = this._state.conflicts;
    for (const conflict of conflicts) pending = upsertBy(pending, "id", freeze(conflict), false);
    this._set({ conflicts: freeze(pending) });
  }

  _resolved(data) {
    const { conflict_id: id, seq, element_id: elementId, prop, resolution = {} } = data;
    const conflict = this._state.conflicts.find((c) => c.id === id);
    const settled = freeze({ ...(conflict ?? { id, element_id: elementId, prop }), status: "resolved", resolution: freeze(resolution), seq });
    const patch = {
      conflicts: freeze(this._state.conflicts.filter((c) => c.id !== id)),
      resolvedConflicts: freeze([settled, ...this._state.resolvedConflicts.filter((c) => c.id !== id)].slice(0, RESOLVED_KEPT)),
    };
    const doc = this._state.document;
    if (typeof seq === "number" && seq > doc.seq) {
      if (seq > doc.seq + 1 && doc.seq > 0) {
        this._set(patch);
        this._ws?.close(4000, "resuming after a gap");
        return;
      }
      this._set(patch);
      // The server says what it applied (`changes`); older stored events only the value.
      const ops = Array.isArray(data.changes)
        ? data.changes
        : resolutionOps(this._state.document, this._tombstones, elementId ?? conflict?.element_id, prop !== undefined ? prop : conflict?.prop, resolution.value, conflict);
      this._apply(ops, seq);
      return;
    }
    this._set(patch);
  }
}

/** The document ops that make `value` the settled state of a conflict (as the server does). */
function resolutionOps(doc, tombstones, elementId, prop, value, conflict) {
  const element = doc.elements[elementId];
  if (prop === null || prop === undefined) {
    if (value === null || value === undefined) return element ? [{ op: "delete", element_id: elementId }] : [];
    if (typeof value !== "object" || Array.isArray(value)) return [];
    if (!element) {
      const restored = tombstones.get(elementId);
      return restored ? [{ op: "insert", element_id: elementId, element_type: restored.type, props: value }] : [];
    }
    return Object.entries(value).map(([key, v]) => ({ op: "set", element_id: elementId, prop: key, value: v }));
  }
  if (!element) {
    const restored = tombstones.get(elementId);
    if (!restored || (conflict?.current?.value == null && value == null)) return [];
    return [{ op: "insert", element_id: elementId, element_type: restored.type, props: { ...restored.props, [prop]: value } }];
  }
  return [{ op: "set", element_id: elementId, prop, value }];
}

function snapshotDocument(snapshot, previous) {
  const elements = {};
  for (const [id, element] of Object.entries(snapshot.elements ?? {})) {
    elements[id] = freeze({ type: element.type, props: freeze(clone(element.props ?? {})) });
  }
  const versions = {};
  for (const [id, props] of Object.entries(snapshot.versions ?? {})) versions[id] = freeze({ ...props });
  // Comments are not part of a snapshot: keep those already seen (a new epoch starts afresh).
  const comments = snapshot.seq >= previous.seq ? previous.comments : [];
  return freeze({
    project_id: snapshot.project_id,
    seq: snapshot.seq,
    elements: freeze(elements),
    versions: freeze(versions),
    comments: freeze(comments.filter((c) => c.seq <= snapshot.seq)),
  });
}

function freezeUser(user) {
  return freeze({ ...user });
}

function upsertBy(list, key, item, newestFirst = true) {
  const index = list.findIndex((x) => x[key] === item[key]);
  if (index >= 0) {
    const copy = [...list];
    copy[index] = freeze({ ...list[index], ...item });
    return copy;
  }
  return newestFirst ? [freeze(item), ...list] : [...list, freeze(item)];
}

// -- live sessions ------------------------------------------------------------------------

/**
 * One live session this client hosts or watches. `localStream` (the host's camera or screen),
 * `remoteStream` (what a viewer receives), `quality` (a viewer's current rung, or the host's
 * latest change per viewer in `qualities`), `on("change" | "quality" | "ended", fn)`.
 */
export class LiveSession {
  constructor(client, info, localStream) {
    this.client = client;
    this.id = info.session_id;
    this.kind = info.kind;
    this.mode = info.mode;
    this.host = info.host;
    this.isHost = info.isHost;
    this.iceServers = info.ice_servers ?? [];
    this.localStream = localStream;
    this.remoteStream = localStream ? null : new MediaStream();
    this.quality = null;
    this.qualities = {};
    this.viewers = new Set(info.viewers ?? []);
    this.status = "connecting";
    this.endedReason = null;
    this._peers = new Map(); // peer name (user id or "server") -> RTCPeerConnection
    this._listeners = new Map();
    this._statsTimer = null;
    this._lastStats = null;
  }

  on(event, handler) {
    if (!this._listeners.has(event)) this._listeners.set(event, new Set());
    this._listeners.get(event).add(handler);
    return () => this._listeners.get(event)?.delete(handler);
  }

  _fire(event, value) {
    for (const handler of [...(this._listeners.get(event) ?? [])]) handler(value, this);
    if (event !== "change") for (const handler of [...(this._listeners.get("change") ?? [])]) handler(this);
  }

  /** End the session (host) or stop watching it (viewer). */
  async stop() {
    if (this.status === "ended") return;
    const type = this.isHost ? "live_stop" : "live_leave";
    try {
      await this.client.request(type, { session_id: this.id });
    } finally {
      this._end(this.isHost ? "stopped" : "left");
      this.client._live.delete(this.id);
    }
  }

  /** Stop watching (a viewer); for the host the same as stop(). */
  leave() {
    return this.stop();
  }

  _peer(name) {
    let pc = this._peers.get(name);
    if (pc) return pc;
    pc = new RTCPeerConnection({ iceServers: this.iceServers });
    this._peers.set(name, pc);
    pc.onicecandidate = (event) => {
      const candidate = event.candidate ? event.candidate.toJSON() : { candidate: "" };
      if (name === "server") return; // the server takes candidates in the SDP (it does not trickle)
      this._signalTo(name, { candidate });
    };
    pc.ontrack = (event) => {
      if (!this.remoteStream) return;
      if (!this.remoteStream.getTracks().includes(event.track)) this.remoteStream.addTrack(event.track);
      this.status = "live";
      this._fire("change", this);
    };
    pc.onconnectionstatechange = () => {
      if (pc.connectionState === "connected" && this.isHost) this.status = "live";
      this._fire("change", this);
    };
    if (this.localStream) {
      for (const track of this.localStream.getTracks()) pc.addTrack(track, this.localStream);
    }
    return pc;
  }

  /** The offer of this side: a viewer to the host (p2p) or to the server (relay), the host to the server. */
  async _offerTo(name) {
    const pc = this._peer(name);
    if (!this.isHost) {
      pc.addTransceiver("video", { direction: "recvonly" });
      pc.addTransceiver("audio", { direction: "recvonly" });
      this._startStats(pc);
    } else {
      for (const transceiver of pc.getTransceivers()) transceiver.direction = "sendonly";
    }
    await pc.setLocalDescription(await pc.createOffer());
    if (name === "server") await gathered(pc);
    await this._signalTo(name, { description: { type: pc.localDescription.type, sdp: pc.localDescription.sdp } });
  }

  _signalTo(to, data) {
    return this.client.request("webrtc_signal", { session_id: this.id, to, ...data }).catch((error) => {
      console.warn(`crealia: signal to ${to} refused: ${error.message}`);
    });
  }

  async _signal(data) {
    const from = data.from;
    try {
      if (data.description) {
        const pc = this._peer(from);
        await pc.setRemoteDescription(data.description);
        if (data.description.type === "offer") {
          // A viewer's offer to the host (p2p): answer with the host's tracks.
          for (const transceiver of pc.getTransceivers()) {
            if (transceiver.sender.track) transceiver.direction = "sendonly";
          }
          await pc.setLocalDescription(await pc.createAnswer());
          await this._signalTo(from, { description: { type: pc.localDescription.type, sdp: pc.localDescription.sdp } });
          this.viewers.add(from);
        }
      }
      if (data.candidate) {
        const pc = this._peers.get(from);
        if (pc) await pc.addIceCandidate(data.candidate.candidate ? data.candidate : null);
      }
    } catch (error) {
      console.warn(`crealia: could not use a signal from ${from}: ${error.message}`);
    }
  }

  async _quality(change) {
    if (!this.isHost) {
      this.quality = change.quality;
      this._fire("quality", change);
      return;
    }
    this.qualities = { ...this.qualities, [change.viewer]: change.quality };
    this._fire("quality", change);
    if (this.mode !== "p2p") return; // the relay applies it to what it sends
    const pc = this._peers.get(change.viewer);
    const rung = QUALITY_LADDER[change.quality];
    if (!pc || !rung) return;
    for (const sender of pc.getSenders()) {
      if (sender.track?.kind !== "video") continue;
      const params = sender.getParameters();
      if (!params.encodings || params.encodings.length === 0) params.encodings = [{}];
      const height = sender.track.getSettings().height ?? rung.height;
      params.encodings[0].maxBitrate = change.max_bitrate_kbps * 1000;
      params.encodings[0].scaleResolutionDownBy = Math.max(1, height / rung.height);
      try {
        await sender.setParameters(params);
      } catch (error) {
        console.warn(`crealia: could not apply ${change.quality}: ${error.message}`);
      }
    }
  }

  _membership(kind, userId) {
    if (kind === "live_joined") this.viewers.add(userId);
    else {
      this.viewers.delete(userId);
      const pc = this._peers.get(userId);
      if (pc && this.isHost) {
        pc.close();
        this._peers.delete(userId);
      }
    }
    this._fire("change", this);
  }

  _startStats(pc) {
    this._statsTimer = setInterval(async () => {
      if (pc.connectionState !== "connected") return;
      const report = await readStats(pc, this._lastStats);
      this._lastStats = report;
      if (report.sample) {
        this.stats = report.sample;
        this.client._send("stream_stats", { session_id: this.id, ...report.sample });
        this._fire("change", this);
      }
    }, 1000);
  }

  _end(reason) {
    if (this.status === "ended") return;
    this.status = "ended";
    this.endedReason = reason;
    clearInterval(this._statsTimer);
    for (const pc of this._peers.values()) pc.close();
    this._peers.clear();
    if (this.isHost && this.localStream) this.localStream.getTracks().forEach((track) => track.stop());
    this._fire("ended", reason);
  }
}

/** Resolve once `pc` has gathered its candidates (bounded: 3 s). */
function gathered(pc) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      if (pc.iceGatheringState === "complete") {
        pc.removeEventListener("icegatheringstatechange", done);
        resolve();
      }
    };
    pc.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, 3000);
  });
}

/** A `stream_stats` sample from a viewer's connection, and what the next one compares with. */
async function readStats(pc, previous) {
  const stats = await pc.getStats();
  let video = null;
  let rtt = null;
  stats.forEach((entry) => {
    if (entry.type === "inbound-rtp" && entry.kind === "video") video = entry;
    if (entry.type === "candidate-pair" && entry.nominated && entry.state === "succeeded") {
      if (typeof entry.currentRoundTripTime === "number") rtt = entry.currentRoundTripTime * 1000;
    }
  });
  if (!video) return { at: performance.now(), bytes: 0, received: 0, lost: 0, sample: null };
  const now = performance.now();
  const bytes = video.bytesReceived ?? 0;
  const received = video.packetsReceived ?? 0;
  const lost = Math.max(0, video.packetsLost ?? 0);
  let bitrate = 0;
  let loss = 0;
  if (previous && now > previous.at) {
    bitrate = ((bytes - previous.bytes) * 8) / (now - previous.at); // bits per ms = kbps
    const packets = received - previous.received + (lost - previous.lost);
    loss = packets > 0 ? Math.min(1, Math.max(0, (lost - previous.lost) / packets)) : 0;
  }
  const sample = previous
    ? {
        bitrate_kbps: Math.max(0, Math.round(bitrate)),
        rtt_ms: Math.max(0, Math.round(rtt ?? 0)),
        packet_loss: loss,
        fps: Math.max(0, video.framesPerSecond ?? 0),
        width: Math.min(16384, video.frameWidth ?? 0),
        height: Math.min(16384, video.frameHeight ?? 0),
      }
    : null;
  return { at: now, bytes, received, lost, sample };
}
