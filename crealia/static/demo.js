// The demo editor: a shared timeline on /crealia.js. Tracks and clips are elements of the
// project's document (`track`: {name, kind, order}; `clip`: {track, start, duration, title});
// the project's title is the element `project`. Every committed edit is one timeline_change.
import { connect } from "/crealia.js";
import { atLeast, claimsOf, fill, h, header, obtainToken, when } from "/static/pages.js";

const PX_PER_S = 40;
const LENGTH_S = 60;
const SEED_CHANGE = "demo-seed-v1";
const SEED = [
  { op: "insert", element_id: "project", element_type: "project", props: { title: "Summer trailer" } },
  { op: "insert", element_id: "track-video", element_type: "track", props: { name: "Video", kind: "video", order: 0 } },
  { op: "insert", element_id: "track-broll", element_type: "track", props: { name: "B-roll", kind: "video", order: 1 } },
  { op: "insert", element_id: "track-audio", element_type: "track", props: { name: "Music", kind: "audio", order: 2 } },
  { op: "insert", element_id: "clip-intro", element_type: "clip", props: { track: "track-video", start: 0, duration: 6, title: "Intro" } },
  { op: "insert", element_id: "clip-beach", element_type: "clip", props: { track: "track-video", start: 7, duration: 9, title: "Beach" } },
  { op: "insert", element_id: "clip-drone", element_type: "clip", props: { track: "track-broll", start: 3, duration: 8, title: "Drone shot" } },
  { op: "insert", element_id: "clip-music", element_type: "clip", props: { track: "track-audio", start: 0, duration: 24, title: "Theme" } },
];

const params = new URLSearchParams(location.search);
const projectId = params.get("project") || "p1";
let client;
let me;
let canEdit = false;
let canComment = false;
let selected = null;
let editingTitle = null; // clip id whose title is being edited
let drag = null;
let live = null;

function colour(userId) {
  let hash = 0;
  for (const ch of userId) hash = (hash * 31 + ch.charCodeAt(0)) >>> 0;
  return `hsl(${hash % 360} 75% 65%)`;
}

function problem(message) {
  const el = document.getElementById("problem");
  el.hidden = !message;
  el.textContent = message ?? "";
  if (message) setTimeout(() => { if (el.textContent === message) el.hidden = true; }, 6000);
}

function doc() {
  return client.state.document;
}

function base(elementId, prop) {
  return doc().versions[elementId]?.[prop] ?? 0;
}

function send(ops) {
  return client.sendTimelineChanges(ops).then(
    (ack) => {
      if (ack.status === "conflict" || ack.status === "partial") problem("Someone changed that at the same time: see the conflict card.");
      return ack;
    },
    (error) => problem(`Not saved: ${error.message}`),
  );
}

function setProps(elementId, props) {
  return send(Object.entries(props).map(([prop, value]) => ({ op: "set", element_id: elementId, prop, value, base: base(elementId, prop) })));
}

function tracks() {
  return Object.entries(doc().elements)
    .filter(([, e]) => e.type === "track")
    .sort((a, b) => (a[1].props.order ?? 0) - (b[1].props.order ?? 0));
}

function clips() {
  return Object.entries(doc().elements).filter(([, e]) => e.type === "clip");
}

function userName(userId) {
  return client.state.users.find((u) => u.user_id === userId)?.name ?? userId;
}

// -- rendering --------------------------------------------------------------------------------

function renderRuler() {
  const ruler = document.getElementById("ruler");
  ruler.style.width = `${LENGTH_S * PX_PER_S}px`;
  const ticks = [];
  for (let s = 0; s <= LENGTH_S; s += 5) ticks.push(h("span", { class: "tick", style: { left: `${s * PX_PER_S}px` } }, `${s}s`));
  const pins = doc().comments.filter((c) => typeof c.time === "number").map((c) => h("span", { class: "pin", title: `${userName(c.user_id)}: ${c.text}`, style: { left: `${c.time * PX_PER_S}px` } }));
  fill(ruler, ticks, pins);
}

let drawn = null; // what the timeline was last drawn from

function renderTimeline() {
  const timeline = document.getElementById("timeline");
  if (drag) return; // the clip being dragged is drawn by the drag
  // Redraw only when what it shows changed (not on every cursor or pong): a redraw replaces
  // the clips, which would lose a double-click or a focus in progress.
  const presence = client.state.users.map((u) => [u.user_id, u.name, u.active_element?.element_id, u.typing]);
  const key = { doc: doc(), selected, editingTitle, presence: JSON.stringify(presence) };
  if (drawn && drawn.doc === key.doc && drawn.selected === key.selected && drawn.editingTitle === key.editingTitle && drawn.presence === key.presence) {
    return renderCursors();
  }
  drawn = key;
  const focused = document.activeElement?.dataset?.clip;
  const comments = doc().comments;
  const others = client.state.users.filter((u) => u.user_id !== me.id);
  fill(
    timeline,
    tracks().map(([trackId, track]) =>
      h("div", { class: "lane", dataset: { track: trackId } },
        h("div", { class: "lane-name" }, track.props.name),
        h("div", { class: "lane-body", style: { width: `${LENGTH_S * PX_PER_S}px` } },
          clips()
            .filter(([, clip]) => clip.props.track === trackId)
            .map(([clipId, clip]) => clipElement(clipId, clip, track, comments.filter((c) => c.element_id === clipId).length, others)),
        ),
      ),
    ),
    h("div", { id: "cursors" }),
  );
  renderCursors();
  if (focused) timeline.querySelector(`[data-clip="${CSS.escape(focused)}"]`)?.focus();
  if (editingTitle) timeline.querySelector(`[data-clip="${CSS.escape(editingTitle)}"] input`)?.focus();
}

function clipElement(clipId, clip, track, commentCount, others) {
  const { start = 0, duration = 1, title = clipId } = clip.props;
  const here = others.filter((u) => u.active_element?.element_id === clipId || u.typing === clipId);
  const label = `${title}, ${start.toFixed(1)} to ${(start + duration).toFixed(1)} s on ${track.props.name}`;
  const body =
    editingTitle === clipId
      ? titleEditor(clipId, title)
      : h("span", { class: "clip-title" }, title);
  return h(
    "div",
    {
      class: `clip ${track.props.kind === "audio" ? "audio" : ""} ${selected === clipId ? "selected" : ""}`,
      tabindex: 0,
      role: "button",
      "aria-label": label,
      "aria-pressed": selected === clipId ? "true" : "false",
      dataset: { clip: clipId },
      style: { left: `${start * PX_PER_S}px`, width: `${Math.max(0.5, duration) * PX_PER_S}px` },
      onpointerdown: (event) => startDrag(event, clipId),
      onkeydown: (event) => clipKey(event, clipId),
      onfocus: () => select(clipId),
    },
    canEdit ? h("span", { class: "edge left", dataset: { edge: "left" }, "aria-hidden": "true" }) : null,
    body,
    h("span", { class: "clip-meta" }, `${start.toFixed(1)}s · ${duration.toFixed(1)}s`),
    commentCount ? h("span", { class: "marks", title: `${commentCount} comments` }, `💬 ${commentCount}`) : null,
    here.length ? h("span", { class: "others" }, here.map((u) => h("span", { style: { color: colour(u.user_id) } }, u.typing === clipId ? `${u.name} is typing… ` : `${u.name} `))) : null,
    canEdit ? h("span", { class: "edge right", dataset: { edge: "right" }, "aria-hidden": "true" }) : null,
  );
}

function renderCursors() {
  const layer = document.getElementById("cursors");
  if (layer) fill(layer, cursors());
}

function cursors() {
  return client.state.users
    .filter((u) => u.user_id !== me.id && u.cursor && typeof u.cursor.x === "number")
    .map((u) => {
      const arrow = document.createElementNS("http://www.w3.org/2000/svg", "svg");
      arrow.setAttribute("width", "14");
      arrow.setAttribute("height", "18");
      arrow.setAttribute("aria-hidden", "true");
      const path = document.createElementNS("http://www.w3.org/2000/svg", "path");
      path.setAttribute("d", "M1 1 L1 16 L5 12 L8 17 L10 16 L7 11 L13 11 Z");
      path.setAttribute("fill", colour(u.user_id));
      path.setAttribute("stroke", "#111");
      arrow.append(path);
      return h("div", { class: "cursor", dataset: { cursor: u.user_id }, style: { left: `${u.cursor.x}px`, top: `${u.cursor.y}px` } }, arrow, h("span", { class: "name", style: { background: colour(u.user_id) } }, u.name));
    });
}

function titleEditor(clipId, title) {
  const input = h("input", { value: title, "aria-label": "Clip title", maxlength: 120 });
  const finish = (commit) => {
    if (editingTitle !== clipId) return;
    editingTitle = null;
    client.stopTyping(clipId);
    const value = input.value.trim();
    if (commit && value && value !== title) setProps(clipId, { title: value });
    render();
  };
  input.addEventListener("keydown", (event) => {
    event.stopPropagation();
    if (event.key === "Enter") finish(true);
    if (event.key === "Escape") finish(false);
  });
  input.addEventListener("blur", () => finish(true));
  input.addEventListener("pointerdown", (event) => event.stopPropagation());
  return input;
}

function editTitle(clipId) {
  editingTitle = clipId;
  client.startTyping(clipId);
  render();
}

function select(clipId) {
  if (selected === clipId) return;
  selected = clipId;
  client.setActiveElement(clipId, "clip");
  const clip = doc().elements[clipId];
  fill(document.getElementById("comment-pin"), clip ? `on ${clip.props.title}` : "on the project");
  if (clip) document.getElementById("comment-time").value = String(clip.props.start ?? 0);
  for (const el of document.querySelectorAll(".clip")) {
    el.classList.toggle("selected", el.dataset.clip === clipId);
    el.setAttribute("aria-pressed", el.dataset.clip === clipId ? "true" : "false");
  }
}

function renderPeople() {
  fill(
    document.getElementById("people"),
    client.state.users.map((u) => {
      const doing = u.typing ? `typing${typeof u.typing === "string" ? " in " + (doc().elements[u.typing]?.props.title ?? u.typing) : ""}…` : u.active_element ? `on ${doc().elements[u.active_element.element_id]?.props.title ?? u.active_element.element_id}` : "";
      return h("li", { dataset: { user: u.user_id } }, h("span", { class: "dot", style: { background: colour(u.user_id) } }), h("span", {}, u.name, u.user_id === me.id ? " (you)" : ""), h("span", { class: "status" }, `${u.role}${doing ? " · " + doing : ""}`));
    }),
  );
  const typingTitle = client.state.users.filter((u) => u.user_id !== me.id && u.typing === "project");
  document.getElementById("title-typing").textContent = typingTitle.length ? `${typingTitle.map((u) => u.name).join(", ")} editing the title…` : "";
}

function show(value) {
  if (value === null || value === undefined) return "(nothing)";
  return typeof value === "string" ? value : JSON.stringify(value);
}

function renderConflicts() {
  const { conflicts, resolvedConflicts } = client.state;
  const name = (id) => doc().elements[id]?.props.title ?? id;
  const pending = conflicts.map((c) =>
    h("article", { class: "conflict pending", dataset: { conflict: c.id }, "aria-label": `Conflict on ${name(c.element_id)}` },
      h("strong", {}, `${name(c.element_id)} · ${c.prop ?? "deleted"}`),
      h("div", { class: "muted" }, `waiting for ${c.strategy}`),
      h("div", { class: "sides" },
        h("div", { class: "side" }, h("div", { class: "muted" }, `current (${userName(c.current.user_id)})`), show(c.current.value)),
        h("div", { class: "side" }, h("div", { class: "muted" }, `incoming (${userName(c.incoming.user_id)})`), show(c.incoming.value)),
      ),
      h("div", { class: "row" },
        h("button", { type: "button", disabled: !canEdit, onclick: () => settle(c.id, "current") }, "Keep current"),
        h("button", { type: "button", class: "primary", disabled: !canEdit, onclick: () => settle(c.id, "incoming") }, "Take incoming"),
        h("button", { type: "button", disabled: !canEdit, onclick: () => dismiss(c.id) }, "Dismiss"),
      ),
    ),
  );
  const settled = resolvedConflicts.slice(0, 5).map((c) =>
    h("article", { class: "conflict resolved", dataset: { conflict: c.id } },
      h("strong", {}, `${name(c.element_id)} · ${c.prop ?? "deleted"}: ${show(c.resolution.value)}`),
      h("div", { class: "confidence" }, `${c.resolution.strategy} · ${c.resolution.choice} · confidence ${Math.round((c.resolution.confidence ?? 0) * 100)} %${c.resolution.review ? " · please review" : ""}`),
      h("p", { class: "explanation" }, c.resolution.explanation),
      c.resolution.choice === "custom"
        ? h("div", { class: "row" },
            h("button", { type: "button", disabled: !canEdit, onclick: () => revert(c.id, "current") }, "Restore current"),
            h("button", { type: "button", disabled: !canEdit, onclick: () => revert(c.id, "incoming") }, "Restore incoming"),
          )
        : h("div", { class: "row" },
            h("button", { type: "button", disabled: !canEdit, "aria-label": `Undo: restore the ${c.resolution.choice === "current" ? "incoming" : "current"} value`, onclick: () => revert(c.id) }, "Undo"),
          ),
    ),
  );
  fill(document.getElementById("conflicts"), pending.length || settled.length ? [pending, settled] : h("p", { class: "empty" }, "No conflict. Edit the same clip at the same time to see one."));
}

function settle(id, choice) {
  client.resolveConflict(id, choice).catch((error) => problem(error.message));
}

function revert(id, side) {
  client.revertConflict(id, side).then((ack) => {
    if (ack.status === "conflict") problem("Someone changed it since: the undo is a new conflict.");
  }).catch((error) => problem(error.message));
}

function dismiss(id) {
  client.dismissConflict(id).catch((error) => problem(error.message));
}

function renderComments() {
  const comments = [...doc().comments].reverse();
  fill(
    document.getElementById("comments"),
    comments.length === 0
      ? h("li", { class: "empty" }, "No comment yet.")
      : comments.map((c) =>
          h("li", { dataset: { comment: c.id } }, h("div", {}, c.text), h("div", { class: "meta" }, `${userName(c.user_id)} · ${c.element_id ? "on " + (doc().elements[c.element_id]?.props.title ?? c.element_id) : "on the project"}${typeof c.time === "number" ? ` · at ${c.time.toFixed(1)} s` : ""} · ${when(c.at)}`)),
        ),
  );
}

function renderConnection() {
  const { connectionStatus, latency, lastMessage } = client.state;
  const badge = document.getElementById("connection");
  badge.className = `badge ${connectionStatus}`;
  badge.textContent = connectionStatus;
  document.getElementById("latency").textContent = latency === null ? "" : `${Math.round(latency)} ms`;
  document.getElementById("last-message").textContent = lastMessage ? `last message ${Math.max(0, Math.round((Date.now() - lastMessage.getTime()) / 1000))} s ago` : "";
}

function renderTitle() {
  const input = document.getElementById("project-title");
  const title = doc().elements.project?.props.title;
  if (document.activeElement !== input && title !== undefined) input.value = title;
  input.disabled = !canEdit;
}

function renderSessions() {
  const list = client.state.liveSessions;
  fill(
    document.getElementById("sessions"),
    list.length === 0
      ? h("li", { class: "empty" }, "Nobody is live.")
      : list.map((s) =>
          h("li", { dataset: { session: s.session_id } },
            h("span", { class: "dot", style: { background: colour(s.host) } }),
            h("span", {}, `${userName(s.host)} · ${s.kind} · ${s.mode} · ${s.viewers?.length ?? 0} watching`),
            s.host === me.id || live?.id === s.session_id ? null : h("button", { type: "button", onclick: () => watch(s.session_id) }, "Watch"),
          ),
        ),
  );
  document.getElementById("go-live-button").disabled = !canEdit || Boolean(live);
}

function render() {
  renderTitle();
  renderRuler();
  renderTimeline();
  renderPeople();
  renderConflicts();
  renderComments();
  renderConnection();
  renderSessions();
}

// -- editing ----------------------------------------------------------------------------------

function startDrag(event, clipId) {
  if (!canEdit || event.button !== 0 || editingTitle === clipId) return;
  const el = event.currentTarget;
  const clip = doc().elements[clipId];
  const edge = event.target.dataset?.edge ?? null;
  drag = { clipId, el, edge, x0: event.clientX, start: clip.props.start ?? 0, duration: clip.props.duration ?? 1, track: clip.props.track, moved: false };
  el.setPointerCapture(event.pointerId);
  el.classList.add("dragging");
  el.addEventListener("pointermove", moveDrag);
  el.addEventListener("pointerup", endDrag, { once: true });
  el.addEventListener("pointercancel", endDrag, { once: true });
}

function dragged(event) {
  const delta = (event.clientX - drag.x0) / PX_PER_S;
  const snap = (v) => Math.round(v * 10) / 10;
  if (drag.edge === "left") {
    const start = Math.min(drag.start + drag.duration - 0.5, Math.max(0, snap(drag.start + delta)));
    return { start, duration: snap(drag.duration + drag.start - start), track: drag.track };
  }
  if (drag.edge === "right") return { start: drag.start, duration: Math.max(0.5, snap(drag.duration + delta)), track: drag.track };
  const lane = document.elementsFromPoint(event.clientX, event.clientY).find((el) => el.classList?.contains("lane"));
  return { start: Math.max(0, snap(drag.start + delta)), duration: drag.duration, track: lane?.dataset.track ?? drag.track };
}

function moveDrag(event) {
  if (!drag) return;
  const next = dragged(event);
  drag.moved = drag.moved || Math.abs(event.clientX - drag.x0) > 2;
  drag.el.style.left = `${next.start * PX_PER_S}px`;
  drag.el.style.width = `${next.duration * PX_PER_S}px`;
  for (const lane of document.querySelectorAll(".lane")) lane.classList.toggle("drop", lane.dataset.track === next.track && next.track !== drag.track);
  pointer(event);
}

function endDrag(event) {
  const current = drag;
  if (!current) return;
  current.el.removeEventListener("pointermove", moveDrag);
  const next = dragged(event);
  drag = null;
  const changes = {};
  if (next.start !== current.start) changes.start = next.start;
  if (next.duration !== current.duration) changes.duration = next.duration;
  if (next.track !== current.track) changes.track = next.track;
  if (!current.moved) {
    // A click, not a drag: leave the clip as it is (a double-click renames it).
    current.el.classList.remove("dragging");
    return;
  }
  if (Object.keys(changes).length) setProps(current.clipId, changes);
  render();
}

function clipKey(event, clipId) {
  if (editingTitle === clipId) return;
  const clip = doc().elements[clipId];
  if (!clip) return;
  if (event.key === "Enter" && canEdit) {
    event.preventDefault();
    return editTitle(clipId);
  }
  if (!canEdit) return;
  const step = event.shiftKey ? 0.1 : 0.5;
  const { start = 0, duration = 1, track } = clip.props;
  const round = (v) => Math.round(v * 10) / 10;
  let changes = null;
  if (event.key === "ArrowLeft" || event.key === "ArrowRight") {
    const sign = event.key === "ArrowRight" ? 1 : -1;
    changes = event.altKey ? { duration: Math.max(0.5, round(duration + sign * step)) } : { start: Math.max(0, round(start + sign * step)) };
  } else if (event.key === "ArrowUp" || event.key === "ArrowDown") {
    const ids = tracks().map(([id]) => id);
    const index = ids.indexOf(track) + (event.key === "ArrowDown" ? 1 : -1);
    if (index >= 0 && index < ids.length) changes = { track: ids[index] };
  }
  if (changes) {
    event.preventDefault();
    setProps(clipId, changes);
  }
}

function pointer(event) {
  const timeline = document.getElementById("timeline");
  const box = timeline.getBoundingClientRect();
  const x = event.clientX - box.left;
  const y = event.clientY - box.top;
  const lane = document.elementsFromPoint(event.clientX, event.clientY).find((el) => el.classList?.contains("lane"));
  const time = Math.max(0, (x - 110) / PX_PER_S);
  client.updateCursor({ x: Math.round(x), y: Math.round(y), time: Math.round(time * 100) / 100, ...(lane ? { track: lane.dataset.track } : {}) });
}

// -- live -------------------------------------------------------------------------------------

function stage(session) {
  live = session;
  const video = document.getElementById("video");
  video.srcObject = session.isHost ? session.localStream : session.remoteStream;
  document.getElementById("stage").hidden = false;
  document.getElementById("stage-label").textContent = session.isHost ? `You are live (${session.kind}, ${session.mode})` : `Watching ${userName(session.host)} (${session.kind}, ${session.mode})`;
  document.getElementById("stage-stop").textContent = session.isHost ? "Stop" : "Leave";
  const quality = document.getElementById("quality");
  const showQuality = () => {
    const text = session.isHost ? Object.entries(session.qualities).map(([viewer, q]) => `${userName(viewer)}: ${q}`).join(", ") : session.quality ?? "";
    quality.textContent = text ? `quality ${text}` : "";
    quality.hidden = !text;
  };
  showQuality();
  session.on("quality", showQuality);
  session.on("ended", (reason) => {
    if (live !== session) return;
    live = null;
    document.getElementById("stage").hidden = true;
    video.srcObject = null;
    if (reason !== "stopped" && reason !== "left") problem(`The live session ended: ${reason}.`);
    renderSessions();
  });
  renderSessions();
}

async function goLive(event) {
  event.preventDefault();
  try {
    const session = await client.startLiveSession({ kind: document.getElementById("live-kind").value, mode: document.getElementById("live-mode").value });
    stage(session);
  } catch (error) {
    problem(`Could not go live: ${error.message}`);
  }
}

async function watch(sessionId) {
  try {
    if (live) await live.stop();
    stage(await client.joinLiveSession(sessionId));
  } catch (error) {
    problem(`Could not watch: ${error.message}`);
  }
}

// -- start ------------------------------------------------------------------------------------

async function main() {
  document.getElementById("top").replaceWith(header(`Demo · ${projectId}`, null));
  const token = await obtainToken({ project: projectId, role: "editor" });
  const claims = claimsOf(token);
  document.querySelector("header.top").replaceWith(header(`Demo · ${projectId}`, claims));
  canEdit = atLeast(claims.role, "editor");
  canComment = atLeast(claims.role, "commenter");
  if (!canEdit) {
    const note = document.getElementById("readonly");
    note.hidden = false;
    note.textContent = canComment ? `You are a ${claims.role}: you can comment, not edit.` : `You are a ${claims.role}: you can watch, not edit or comment.`;
  }
  for (const el of document.querySelectorAll("#comment-form input, #comment-form button")) el.disabled = !canComment;
  client = connect({ url: `ws://${location.host}/ws`, token, projectId });
  window.crealiaClient = client; // for the console (and the tests)
  let seeded = false;
  let frame = null;
  client.subscribe((state) => {
    if (!state.user) return;
    me = state.user;
    if (!seeded && state.isConnected && canEdit && !Object.values(state.document.elements).some((e) => e.type === "track")) {
      seeded = true;
      client.sendTimelineChanges(SEED, { changeId: SEED_CHANGE }).catch(() => {}); // someone else seeded it
    }
    frame ??= requestAnimationFrame(() => {
      frame = null;
      render();
    });
  });
  setInterval(() => client.state.user && renderConnection(), 1000);
  document.getElementById("timeline").addEventListener("dblclick", (event) => {
    const clip = event.target.closest?.("[data-clip]");
    if (clip && canEdit && !event.target.closest("input")) editTitle(clip.dataset.clip);
  });
  document.getElementById("timeline").addEventListener("pointermove", (event) => client.state.user && !drag && pointer(event));
  const title = document.getElementById("project-title");
  title.addEventListener("focus", () => client.startTyping("project"));
  title.addEventListener("blur", () => client.stopTyping("project"));
  title.addEventListener("change", () => {
    const value = title.value.trim();
    if (value && doc().elements.project) setProps("project", { title: value });
  });
  title.addEventListener("keydown", (event) => event.key === "Enter" && title.blur());
  document.getElementById("comment-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = document.getElementById("comment-text");
    const time = parseFloat(document.getElementById("comment-time").value);
    client
      .addComment({ text: text.value.trim(), element_id: selected ?? undefined, time: Number.isFinite(time) ? time : undefined })
      .then(() => { text.value = ""; }, (error) => problem(`Comment not added: ${error.message}`));
  });
  document.getElementById("go-live").addEventListener("submit", goLive);
  document.getElementById("stage-stop").addEventListener("click", () => live?.stop().catch((error) => problem(error.message)));
}

main();
