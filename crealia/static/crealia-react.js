// crealia-react.js: the seed's `useAdvancedCollaboration` hook over /crealia.js.
//
// React comes from the app, through an import map (no copy of React is served here):
//
//   <script type="importmap">{"imports": {"react": "/vendor/react.js"}}</script>
//   import { useAdvancedCollaboration } from "/crealia-react.js";
//   const { isConnected, users, conflicts, sendTimelineChanges } =
//     useAdvancedCollaboration(projectId, userId, { url, token });
//
// `userId` is only checked against the token's user (the token says who the user is); the
// connection opens on mount and closes on unmount, or when projectId, url or token change.

import { useCallback, useEffect, useMemo, useSyncExternalStore } from "react";
import { connect } from "/crealia.js";

const DISCONNECTED = Object.freeze({
  isConnected: false,
  connectionStatus: "connecting",
  latency: null,
  lastMessage: null,
  users: Object.freeze([]),
  conflicts: Object.freeze([]),
  resolvedConflicts: Object.freeze([]),
  document: null,
  performanceMetrics: null,
  alerts: Object.freeze([]),
  securityAlerts: Object.freeze([]),
  liveSessions: Object.freeze([]),
  user: null,
  error: null,
});

/**
 * @param {string} projectId
 * @param {string} [userId] the token's user, checked (a mismatch puts `error` in the state)
 * @param {{url?: string, token: string} & Record<string, unknown>} options passed to connect()
 */
export function useAdvancedCollaboration(projectId, userId, options) {
  const { url = `ws://${location.host}/ws`, token, ...rest } = options ?? {};
  const client = useMemo(
    () => (token && projectId ? connect({ url, token, projectId, ...rest }) : null),
    // Other options are read once per connection.
    // eslint-disable-next-line react-hooks/exhaustive-deps
    [url, token, projectId],
  );
  useEffect(() => () => client?.close(), [client]);
  const subscribe = useCallback((listener) => (client ? client.subscribe(listener) : () => {}), [client]);
  const state = useSyncExternalStore(subscribe, () => (client ? client.state : DISCONNECTED));
  const mismatch = userId && state.user && state.user.id !== userId;
  const bound = useMemo(() => {
    const call = (name) => (...args) => (client ? client[name](...args) : Promise.reject(new Error("not connected")));
    return {
      updateCursor: (position) => client?.updateCursor(position),
      setActiveElement: (id, type) => client?.setActiveElement(id, type),
      startTyping: (id) => client?.startTyping(id),
      stopTyping: (id) => client?.stopTyping(id),
      sendTimelineChanges: call("sendTimelineChanges"),
      addComment: call("addComment"),
      resolveConflict: call("resolveConflict"),
      dismissConflict: call("dismissConflict"),
      startLiveSession: call("startLiveSession"),
      joinLiveSession: call("joinLiveSession"),
    };
  }, [client]);
  return {
    ...state,
    error: mismatch ? `the token is ${state.user.id}'s, not ${userId}'s` : state.error,
    ...bound,
    client,
  };
}
