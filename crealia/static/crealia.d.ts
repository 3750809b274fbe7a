// Types of /crealia.js, the browser client of a crealia server (docs/protocol.md §9).
// Editors pick them up beside the module; TypeScript users: `declare module "/crealia.js"`
// re-exporting these, or copy this file next to your code.

export const PROTOCOL: "crealia.v1";

export type Quality = "360p" | "480p" | "720p" | "1080p";
export const QUALITY_LADDER: Readonly<Record<Quality, { width: number; height: number; maxBitrateKbps: number }>>;

export type Role = "owner" | "editor" | "commenter" | "viewer";
export type ConnectionStatus = "connecting" | "connected" | "disconnected" | "error";

export interface ConnectOptions {
  /** `ws://host:port/ws`; pages use `ws://${location.host}/ws`. */
  url: string;
  /** A JWT for this project (docs/protocol.md §1). */
  token: string;
  projectId: string;
  /** Reconnect after a lost connection (default true). Never after 4400 or 4401. */
  reconnect?: boolean;
  /** Backoff between attempts: jittered, doubling from min to max (default 250 and 10000 ms). */
  minBackoffMs?: number;
  maxBackoffMs?: number;
  /** Ping period (default 10000 ms); `latency` is the latest round trip. */
  pingIntervalMs?: number;
  /** Subscribe to the metrics feed (§13): "auto" (default) when the token is an owner's. */
  metrics?: boolean | "auto";
  /** A WebSocket constructor (default the browser's). */
  WebSocket?: typeof WebSocket;
}

export interface CursorPosition {
  x: number;
  y: number;
  time?: number;
  track?: string;
}

export interface UserEntry {
  user_id: string;
  name: string;
  role: Role;
  connections: number;
  cursor: CursorPosition | null;
  active_element: { element_id: string; element_type: string } | null;
  /** The element id being typed in, `true` for none named, `null` when not typing. */
  typing: string | true | null;
}

export interface Element {
  type: string;
  props: Readonly<Record<string, unknown>>;
}

export interface Comment {
  id: string;
  text: string;
  element_id?: string;
  time?: number;
  user_id: string;
  at: number;
  seq: number;
}

export interface Document {
  project_id: string;
  /** The last durable seq applied: what a resume sends. */
  seq: number;
  elements: Readonly<Record<string, Element>>;
  /** The seq that last wrote each property: a `set`'s `base`. */
  versions: Readonly<Record<string, Readonly<Record<string, number>>>>;
  /** Comments seen since the document was loaded (a snapshot holds none). */
  comments: readonly Comment[];
}

export interface Resolution {
  value: unknown;
  choice: "current" | "incoming" | "custom";
  strategy: string;
  confidence: number;
  explanation: string;
  review?: boolean;
}

export interface Conflict {
  id: string;
  element_id: string;
  /** `null` for a conflicting delete. */
  prop: string | null;
  base_value: unknown;
  current: { value: unknown; user_id: string; seq: number };
  incoming: { value: unknown; user_id: string; change_id: string };
  strategy: string;
  status: "pending" | "resolved";
  /** Settled conflicts (`state.resolvedConflicts`) only. */
  resolution?: Resolution;
  seq?: number;
}

export interface LiveSessionInfo {
  session_id: string;
  host: string;
  kind: "camera" | "screen";
  mode: "p2p" | "relay";
  viewers: string[];
  started_at?: number;
  ice_servers?: RTCIceServer[];
}

export interface State {
  isConnected: boolean;
  connectionStatus: ConnectionStatus;
  latency: number | null;
  lastMessage: Date | null;
  users: readonly UserEntry[];
  /** Pending conflicts. */
  conflicts: readonly Conflict[];
  /** The latest settled conflicts (at most 50), newest first, each with its `resolution`. */
  resolvedConflicts: readonly Conflict[];
  document: Document;
  /** The latest metrics sample (owners; docs/protocol.md §13), or null. */
  performanceMetrics: Record<string, unknown> | null;
  /** Performance alerts as they fire and resolve (owners), newest first. */
  alerts: readonly Record<string, unknown>[];
  /** Security alerts pushed while connected (owners), newest first. */
  securityAlerts: readonly Record<string, unknown>[];
  /** The project's open live sessions. */
  liveSessions: readonly LiveSessionInfo[];
  /** Who this client is, from `welcome`. */
  user: { id: string; name: string; role: Role } | null;
  sessionId: string | null;
  epoch: string | null;
  /** Why the connection is in "error" (or the last refusal of `hello`), else null. */
  error: string | null;
}

export type Op =
  | { op: "insert"; element_id: string; element_type: string; props?: Record<string, unknown> }
  | { op: "set"; element_id: string; prop: string; value: unknown; base?: number }
  | { op: "delete"; element_id: string; base?: number };

export interface ChangeAck {
  change_id: string;
  seq: number | null;
  status: "applied" | "partial" | "conflict" | "duplicate";
  conflicts: string[];
}

/** An error the server answered; `code` is one of docs/protocol.md §7's, or "disconnected"/"closed". */
export class CrealiaError extends Error {
  code: string;
  retryAfterMs: number | null;
}

export class LiveSession {
  readonly id: string;
  readonly kind: "camera" | "screen";
  readonly mode: "p2p" | "relay";
  readonly host: string;
  readonly isHost: boolean;
  /** The host's camera or screen. */
  readonly localStream: MediaStream | null;
  /** What a viewer receives. */
  readonly remoteStream: MediaStream | null;
  /** A viewer's current rung (from `quality_change`), null until the first. */
  quality: Quality | null;
  /** The host's view: each viewer's current rung. */
  qualities: Readonly<Record<string, Quality>>;
  viewers: Set<string>;
  status: "connecting" | "live" | "ended";
  endedReason: string | null;
  /** A viewer's latest statistics, as sent in `stream_stats`. */
  stats?: { bitrate_kbps: number; rtt_ms: number; packet_loss: number; fps: number; width: number; height: number };
  on(event: "change", handler: (session: LiveSession) => void): () => void;
  on(event: "quality", handler: (change: { session_id: string; quality: Quality; max_bitrate_kbps: number; reason: string; viewer: string }) => void): () => void;
  on(event: "ended", handler: (reason: string) => void): () => void;
  /** The host ends the session; a viewer leaves it. */
  stop(): Promise<void>;
  leave(): Promise<void>;
}

export class Client {
  readonly state: State;
  subscribe(listener: (state: State) => void): () => void;
  on(type: string, handler: (data: any, envelope: { type: string; data: any; ref?: number }) => void): () => void;
  close(): void;
  /** At most one cursor_update per animation frame: the latest position wins. */
  updateCursor(position: CursorPosition): void;
  setActiveElement(elementId: string | null, elementType?: string): void;
  startTyping(elementId?: string): void;
  stopTyping(elementId?: string): void;
  /** Resolves once durable; resent with its change_id after reconnects until acked. */
  sendTimelineChanges(ops: Op[], options?: { changeId?: string }): Promise<ChangeAck>;
  addComment(comment: { text: string; element_id?: string; time?: number; id?: string }): Promise<{ seq: number; status?: string }>;
  resolveConflict(conflictId: string, choice: "current" | "incoming" | "custom", value?: unknown): Promise<Record<string, unknown>>;
  dismissConflict(conflictId: string): Promise<Record<string, unknown>>;
  /** conflict_revert: restores `side` (default: the side the resolution did not choose). */
  revertConflict(conflictId: string, side?: "current" | "incoming"): Promise<ChangeAck>;
  /** conflict_preview: the dry run of POST /api/collaboration/conflicts/detect. */
  previewChanges(ops: Op[]): Promise<{ applies: Op[]; conflicts: Array<Record<string, unknown>> }>;
  requestUsers(): Promise<readonly UserEntry[]>;
  /** Any client message with a ref; resolves with its reply's data. */
  request(type: string, data?: Record<string, unknown>): Promise<any>;
  startLiveSession(options?: { kind?: "camera" | "screen"; mode?: "p2p" | "relay"; audio?: boolean; stream?: MediaStream }): Promise<LiveSession>;
  joinLiveSession(sessionId: string): Promise<LiveSession>;
}

export function connect(options: ConnectOptions): Client;
