// The page: polls /status and /topology, reads /events, and wires the controls to the admin API.

// Plain browser JavaScript modules, no build step: what is served is what runs.
import { MAX_CLIENTS, outcome, state } from "./model.js";
import { animate, backendName, logEvent, render, renderClients, renderTallies } from "./diagram.js";
import { startScenarios } from "./scenarios.js";

const STATUS_EVERY_MS = 1000;
const TOPOLOGY_EVERY_MS = 2000;

function toast(message, bad) {
  const node = document.getElementById("toast");
  node.textContent = message;
  node.className = "show" + (bad ? " bad" : "");
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { node.className = ""; }, 3500);
}

// The admin token, when the lab has one, comes in the page's address as #token=... and
// never leaves this tab (sessionStorage); the admin API asks for it on every change.
const token = new URLSearchParams(location.hash.slice(1)).get("token") || sessionStorage.getItem("lbsession-token");
if (token) sessionStorage.setItem("lbsession-token", token);

async function api(method, path, body) {
  const options = { method, headers: {} };
  if (method !== "GET") {
    // Always JSON, even with nothing to say: the admin API refuses other changes, so that a
    // page on another site cannot make this browser send one (it would need a CORS preflight).
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body === undefined ? {} : body);
    if (token) options.headers["Authorization"] = "Bearer " + token;
  }
  const response = await fetch(path, options);
  let data = null;
  try { data = await response.json(); } catch (err) { data = null; }
  if (!response.ok) {
    const error = new Error((data && data.error) || `${method} ${path}: HTTP ${response.status}`);
    error.status = response.status;
    throw error;
  }
  return data;
}

// ------------------------------------------------------------------ polling

function refresh() {
  render();
  if (!state.status) return;
  fillStrategies(document.getElementById("strategy"), state.status.strategies || [state.status.strategy]);
  document.getElementById("strategy").value = state.status.strategy;
  document.getElementById("backend").textContent = "backend " + (backendName() || "?");
  document.getElementById("count-tunnels").textContent = state.status.tunnels ? state.status.tunnels.open : 0;
  document.getElementById("kill-redis").hidden = !(state.topology && state.topology.redis);
  document.getElementById("add-server").hidden = !state.topology;
  document.getElementById("lab-hint").textContent = state.topology
    ? "Kill or restart a server with the buttons on its box."
    : "This balancer runs alone (lbsession lb): it controls no processes. Switch strategy above.";
}

function fillStrategies(select, names) {
  // Rebuilt only when the list changes: rebuilding would close the menu under the user's pointer.
  if ([...select.options].map((o) => o.value).join() === names.join()) return;
  select.replaceChildren(...names.map((name) => new Option(name, name)));
}

async function pollStatus() {
  try {
    const status = await api("GET", "/status");
    const now = performance.now();
    for (const server of status.servers) {
      const before = state.previous.get(server.id);
      if (before && now > before.t) state.rates.set(server.id, (server.requests - before.requests) * 1000 / (now - before.t));
      state.previous.set(server.id, { requests: server.requests, t: now });
    }
    state.status = status;
    refresh();
  } catch (err) {
    setStream("admin API unreachable", "down");
  }
}

async function pollTopology() {
  try {
    state.topology = await api("GET", "/topology");
    for (const server of state.topology.servers) if (server.pid !== null) state.killed.delete(server.id);
    state.links = state.topology.links ? new Map((await api("GET", "/links")).links.map((l) => [l.name, l])) : null;
  } catch (err) {
    if (err.status === 404) {
      state.topology = null; // a bare `lbsession lb`: no processes to control, nothing more to ask
      clearInterval(pollTopology.timer);
    }
  }
  refresh();
}

// ------------------------------------------------------------------ the event stream

function setStream(label, cls) {
  const pill = document.getElementById("stream");
  pill.textContent = label;
  pill.className = "pill " + cls;
}

function connectEvents() {
  const source = new EventSource("/events");
  source.onopen = () => setStream("live", "live");
  source.onerror = () => setStream("reconnecting…", "wait");
  source.onmessage = (message) => {
    const event = JSON.parse(message.data);
    if (event.type === "request") onRequest(event);
    else if (event.type === "dropped") { state.tally.dropped += event.dropped; renderTallies(); }
    else if (event.type === "server" || event.type === "strategy") { pollStatus(); pollTopology(); }
  };
}

function clientKey(event) {
  return event.user ? "u:" + event.user : "ip:" + event.client;
}

function onRequest(event) {
  const kind = outcome(event.status);
  state.tally.requests += 1;
  state.tally[kind] += 1;
  const key = clientKey(event);
  const client = state.clients.get(key) || { key, ok: 0, relogin: 0, error: 0, other: 0 };
  Object.assign(client, { user: event.user, ip: event.client, status: event.status, server: event.server, reason: event.reason });
  client[kind] += 1;
  state.clients.delete(key); // re-insert: the map's order is recency
  state.clients.set(key, client);
  while (state.clients.size > MAX_CLIENTS) state.clients.delete(state.clients.keys().next().value);
  renderTallies();
  renderClients();
  logEvent(event, kind);
  animate(event, key, kind);
}

// ------------------------------------------------------------------ controls

async function act(control, method, path, done, before, after, body) {
  control.classList.add("busy");
  if (control.disabled !== undefined) control.disabled = true;
  try {
    if (before) before();
    refresh();
    await api(method, path, body !== undefined ? body : method === "POST" || method === "PUT" ? {} : undefined);
    if (after) after();
    toast(done);
  } catch (err) {
    toast(err.message, true);
  } finally {
    control.classList.remove("busy");
    if (control.disabled !== undefined) control.disabled = false;
    await Promise.all([pollTopology(), pollStatus()]);
  }
}

async function switchStrategy(name) {
  try {
    const answer = await api("PUT", "/strategy", { strategy: name });
    toast(`strategy is now ${answer.strategy}`);
  } catch (err) {
    toast(err.message, true);
  }
  pollStatus();
}

async function demo(action, username) {
  const reply = await api("POST", "/demo/" + action, { username });
  if (action === "login" && reply.sent_tag && reply.sent_tag !== reply.tag) {
    nameTags(reply.user + " (old session)", [reply.sent_tag]); // login rotates the session id
    nameTags(reply.user, [reply.tag]);
  } else {
    nameTags(reply.user, [reply.sent_tag, reply.tag]);
  }
  const item = document.createElement("li");
  const kind = outcome(reply.status);
  item.className = kind;
  item.dataset.status = reply.status;
  item.dataset.server = reply.server || "";
  let said = reply.body;
  try { const body = JSON.parse(reply.body); said = body.error || (body.user ? "you are " + body.user : reply.body); } catch (err) { /* not JSON */ }
  const request = action === "login" ? "POST /login" : "GET /me";
  item.textContent = `${reply.user}: ${request} → ${reply.status ?? "failed"} ${said} (${reply.server || "no server"})`;
  const log = document.getElementById("demo-log");
  log.prepend(item);
  while (log.children.length > 20) log.lastChild.remove();
  return reply;
}

function nameTags(name, tags) {
  // Events name users by a hash of their cookie; the demo replies say which hashes are whose.
  let changed = false;
  for (const tag of tags) {
    if (tag && state.names.get(tag) !== name) {
      state.names.set(tag, name);
      changed = true;
    }
  }
  if (!changed) return;
  renderClients();
  for (const cell of document.querySelectorAll("#event-log td[data-user]")) {
    if (state.names.has(cell.dataset.user)) cell.textContent = state.names.get(cell.dataset.user);
  }
}

function username() {
  return document.getElementById("username").value.trim() || "alice";
}

const pause = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function askSixTimes(name) {
  for (let i = 0; i < 6; i++) {
    await demo("me", name);
    await pause(350);
  }
}

function onDiagramClick(event) {
  // The diagram's buttons are redrawn as the lab changes, so one listener serves them all.
  const control = event.target.closest(".svg-button[data-action]");
  if (!control) return;
  const { action, target } = control.dataset;
  const id = encodeURIComponent(target);
  if (action === "kill") {
    act(control, "POST", `/servers/${id}/kill`, `${target} killed (SIGKILL)`, () => state.killed.add(target));
  } else if (action === "restart") {
    act(control, "POST", `/servers/${id}/restart`, `${target} restarted`, null, () => state.killed.delete(target));
  } else if (action === "restart-redis") {
    act(control, "POST", `/redis/${id}/restart`, `${target} restarted`);
  } else if (action === "link") {
    const next = control.dataset.next;
    const faults = { slow: { latency_ms: 200 }, cut: { blackhole: true } }[next];
    if (faults) act(control, "PUT", `/links/${id}`, `${target}: ${next === "slow" ? "+200 ms" : "cut, bytes held"}`, null, null, faults);
    else act(control, "DELETE", `/links/${id}`, `${target} healed`, null, null, {});
  }
}

function wireControls() {
  document.getElementById("diagram").addEventListener("click", onDiagramClick);
  document.getElementById("strategy").addEventListener("change", (event) => switchStrategy(event.target.value));
  document.getElementById("login-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const btn = document.getElementById("login");
    btn.disabled = true;
    try {
      const name = username();
      await demo("login", name);
      await askSixTimes(name);
    } catch (err) {
      toast(err.message, true);
    } finally {
      btn.disabled = false;
    }
  });
  document.getElementById("ask").addEventListener("click", () => askSixTimes(username()).catch((err) => toast(err.message, true)));
  document.getElementById("browse").addEventListener("change", (event) => {
    clearInterval(wireControls.browsing);
    if (event.target.checked) wireControls.browsing = setInterval(() => demo("me", username()).catch(() => {}), 1000);
  });
  const add = document.getElementById("add-server");
  add.addEventListener("click", () => act(add, "POST", "/topology/servers", "a new server joined"));
  const killRedis = document.getElementById("kill-redis");
  killRedis.addEventListener("click", () => act(killRedis, "POST", "/redis/primary/kill", "Redis primary killed (SIGKILL)", null, () => {
    const other = state.topology.redis.nodes.find((n) => n.name !== state.primary && n.pid !== null);
    if (other && state.topology.redis.ha) state.primary = other.name; // Sentinel promotes the replica
  }));
}

function start() {
  wireControls();
  connectEvents();
  pollTopology().then(pollStatus);
  startScenarios(api, toast);
  setInterval(pollStatus, STATUS_EVERY_MS);
  pollTopology.timer = setInterval(pollTopology, TOPOLOGY_EVERY_MS);
}

document.addEventListener("DOMContentLoaded", start);
