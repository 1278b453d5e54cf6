// The diagram: clients, the balancer, the servers and their session store, in SVG; and the moving requests.

import { CLIENT_H, COL, DOT_MS, LOG_ROWS, MAX_CLIENTS, MAX_DOTS, WIDTH, clientLabel, outcome, state, svg, text } from "./model.js";

function button(parent, x, y, w, label, attrs) {
  // No handler here: the page listens on the whole diagram and acts on data-action (see dashboard.js).
  const group = svg("g", { class: "svg-button", transform: `translate(${x},${y})`, role: "button", ...attrs }, parent);
  svg("rect", { width: w, height: 22, rx: 6 }, group);
  text(group, w / 2, 15, label, "", "middle");
  return group;
}

// ------------------------------------------------------------------ rendering

function geometry(servers) {
  const rows = Math.max(servers.length, 3);
  const rowH = 112;
  const top = 52;
  const height = Math.max(420, top + rows * rowH + 16);
  const middle = top + (height - top) / 2;
  const serverY = new Map();
  const start = top + ((height - top) - servers.length * rowH) / 2;
  servers.forEach((server, i) => serverY.set(server.id, start + i * rowH + 6));
  return { height, top, middle, rowH, serverY, lbY: middle - 70 };
}

export function render() {
  const status = state.status;
  if (!status) return;
  const root = document.getElementById("diagram");
  const geo = (state.geometry = geometry(status.servers));
  root.setAttribute("viewBox", `0 0 ${WIDTH} ${geo.height}`);
  if (!root.firstChild) {
    for (const id of ["headings", "edges", "store", "clients", "lb", "servers", "dots"]) svg("g", { id: "layer-" + id }, root);
  }
  const backend = backendName();
  renderHeadings(geo, backend);
  renderEdges(geo, backend);
  renderStore(geo, backend);
  renderClients();
  renderBalancer(geo);
  renderServers(geo, backend);
}

export function backendName() {
  if (state.topology) return state.topology.backend;
  const health = (state.status.servers.find((s) => s.health) || {}).health;
  return health ? health.backend : null;
}

function renderHeadings(geo, backend) {
  const layer = document.getElementById("layer-headings");
  layer.replaceChildren();
  text(layer, COL.client, 26, "clients", "heading");
  text(layer, COL.lb, 26, "load balancer", "heading");
  text(layer, COL.server, 26, "app servers", "heading");
  text(layer, COL.store, 26, "session store", "heading");
  const where = {
    local: "one per server", cluster: "a full copy per server", redis: "shared by every server", cookie: "in the client",
  };
  text(layer, COL.store, 42, where[backend] || "", "small");
}

function serverCenterY(geo, id) {
  const y = geo.serverY.get(id);
  return y === undefined ? geo.middle : y + 52;
}

// A link (lbsession/lab/links.py) drawn on its edge: cut red and dashed, slowed amber with its latency.
function linkClass(name) {
  const link = state.links && state.links.get(name);
  return link && link.state !== "ok" ? " " + link.state : "";
}

function linkLatency(link) {
  const both = Object.values(link.faults).filter((f) => typeof f === "object" && !Array.isArray(f));
  const ms = Math.max(0, ...both.map((f) => (f.latency_ms || 0) + (f.jitter_ms || 0)));
  return ms ? `+${ms} ms` : "slowed";
}

function linkControl(layer, name, x, y) {
  // One button per link, cycling: slow it (+200 ms), cut it (bytes held), heal it.
  const link = state.links && state.links.get(name);
  if (!link) return;
  const next = { ok: "slow", slowed: "cut", cut: "heal" }[link.state] || "heal";
  if (link.state === "slowed") text(layer, x, y - 8, linkLatency(link), "small link-label", "middle");
  if (link.state === "cut") text(layer, x, y - 8, "cut", "small link-label cut", "middle");
  button(layer, x - 20, y, 40, next, { "data-action": "link", "data-target": name, "data-next": next, class: "svg-button link-button" });
}

function renderEdges(geo, backend) {
  const layer = document.getElementById("layer-edges");
  layer.replaceChildren();
  const lbMid = geo.lbY + 70;
  for (const server of state.status.servers) {
    const down = !server.healthy || state.killed.has(server.id);
    const y = serverCenterY(geo, server.id);
    const name = `lb->${server.id}`;
    svg("path", { class: "edge" + (down ? " down" : "") + linkClass(name), "data-link": name, d: `M${COL.lb + COL.lbW},${lbMid} C${COL.lb + COL.lbW + 50},${lbMid} ${COL.server - 50},${y} ${COL.server},${y}` }, layer);
    linkControl(layer, name, (COL.lb + COL.lbW + COL.server) / 2, (lbMid + y) / 2 - 11);
  }
}

function renderPeers(geo, layer) {
  // Session clustering: one arc per pair of servers, coloured by the worse of its two links.
  const byAddress = new Map();
  for (const server of (state.topology && state.topology.servers) || []) if (server.cluster_address) byAddress.set(server.cluster_address, server.id);
  const links = new Map();
  for (const server of state.status.servers) {
    for (const peer of (server.health && server.health.peers) || []) {
      const other = byAddress.get(peer.address);
      if (!other) continue;
      const key = [server.id, other].sort().join("|");
      const rank = { up: 0, connecting: 1, down: 2, refused: 3 }[peer.state] ?? 1;
      links.set(key, Math.max(links.get(key) ?? 0, rank));
    }
  }
  const x = COL.store + COL.storeW;
  for (const [key, rank] of links) {
    const [a, b] = key.split("|");
    const ya = serverCenterY(geo, a), yb = serverCenterY(geo, b);
    const bulge = x + 14 + Math.min(Math.abs(ya - yb) * 0.12, 44);
    // With links, the pair's two replication links (was-1->was-2, was-2->was-1): a fault on either shows.
    const names = [`${a}->${b}`, `${b}->${a}`];
    const faulted = names.map((n) => state.links && state.links.get(n)).filter((l) => l && l.state !== "ok");
    const worst = faulted.find((l) => l.state === "cut") || faulted[0];
    const cls = worst ? worst.state : rank === 0 ? "peer-up" : rank >= 2 ? "peer-bad" : "peer-wait";
    const attrs = { class: "edge " + cls, d: `M${x},${ya} C${bulge},${ya} ${bulge},${yb} ${x},${yb}` };
    if (state.links && state.links.has(names[0])) attrs["data-link"] = names.join(" ");
    svg("path", attrs, layer);
    if (worst) text(layer, bulge + 4, (ya + yb) / 2 + 4, worst.state === "cut" ? "cut" : linkLatency(worst), "small link-label" + (worst.state === "cut" ? " cut" : ""));
  }
}

function renderStore(geo, backend) {
  const layer = document.getElementById("layer-store");
  layer.replaceChildren();
  if (backend === "local" || backend === "cluster") {
    for (const server of state.status.servers) drawMemory(layer, geo, server, backend);
    if (backend === "cluster") {
      renderPeers(geo, layer);
      text(layer, COL.store, geo.height - 8, "blue: replicating · red: refused or down", "small");
    }
    return;
  }
  if (backend === "redis") renderRedis(geo, layer);
  if (backend === "cookie") renderCookieStore(geo, layer);
}

function renderCookieStore(geo, layer) {
  // Nothing on the servers: each client carries its whole session, sealed, in its SESSION cookie.
  const health = state.status.servers.map((s) => s.health).find((h) => h && h.max_cookie_bytes);
  const limit = health ? health.max_cookie_bytes : 4096;
  const sizes = state.status.servers.map((s) => s.health).filter((h) => h && h.cookie_bytes_max);
  const largest = Math.max(0, ...sizes.map((h) => h.cookie_bytes_max));
  const size = sizes.length ? `~${sizes[0].cookie_bytes_mean} B each, ${largest} B max` : "no cookie sealed yet";
  text(layer, COL.store, 80, "the SESSION cookie", "role");
  text(layer, COL.store, 100, `sealed, at most ${limit} B`, "small");
  text(layer, COL.store, 118, size, "small").setAttribute("data-cookie-size", "");
  // Logout is not revocation, unless the store keeps a deny-list (and is then no longer stateless).
  text(layer, COL.store, 136, health && health.deny_list ? "logouts denied in Redis" : "logout cannot revoke", "small");
}

function renderRedis(geo, layer) {
  const redis = state.topology && state.topology.redis;
  const nodes = redis ? redis.nodes : [{ name: "redis", port: null, pid: 0, external: true }];
  const alive = nodes.filter((n) => n.pid !== null);
  const master = nodes.find((n) => n.role === "master" && n.pid !== null); // asked of the nodes by /topology
  if (master) state.primary = master.name;
  else if (!state.primary || !alive.some((n) => n.name === state.primary)) state.primary = (alive[0] || nodes[0]).name;
  const step = 140;
  const first = geo.middle - ((nodes.length - 1) * step) / 2 - 40;
  const y = (i) => first + i * step;
  if (nodes.length > 1 && alive.length > 1) {
    const mid = COL.store + COL.storeW / 2; // the replica follows the primary, on its own link (redis-2->redis-1)
    const [replica, primary] = nodes[1].name === state.primary ? [nodes[0], nodes[1]] : [nodes[1], nodes[0]];
    const name = `${replica.name}->${primary.name}`;
    svg("path", { class: "edge " + (linkClass(name).trim() || "peer-up"), "data-link": name, d: `M${mid},${y(0) + 86} L${mid},${y(1)}` }, layer);
  }
  nodes.forEach((node, i) => {
    const primary = node.name === state.primary;
    if (primary) {
      for (const server of state.status.servers) {
        const name = `${server.id}->${node.name}`, sy = serverCenterY(geo, server.id);
        svg("path", { class: "edge store" + linkClass(name), "data-link": name, d: `M${COL.server + COL.serverW},${sy} L${COL.store},${y(i) + 40}` }, layer);
        linkControl(layer, name, (COL.server + COL.serverW + COL.store) / 2, (sy + y(i) + 40) / 2 - 11);
      }
    }
    drawCan(layer, node, y(i), primary, redis);
  });
  if (redis && redis.sentinels.length) {
    text(layer, COL.store, y(nodes.length - 1) + 118, `+ ${redis.sentinels.length} Sentinels: failover`, "small");
  }
}

function drawMemory(layer, geo, server, backend) {
  // One store per server: its memory (local) or its full copy (cluster); it dies with the server.
  const y = serverCenterY(geo, server.id);
  const lost = serverState(server) === "killed";
  svg("path", { class: "edge store", d: `M${COL.server + COL.serverW},${y} L${COL.store},${y}` }, layer);
  const group = svg("g", { class: "store" + (lost ? " dead" : ""), transform: `translate(${COL.store},${y - 34})`, "data-memory": server.id }, layer);
  const w = COL.storeW, h = 52;
  svg("path", { class: "can", d: `M0,8 a${w / 2},8 0 0,1 ${w},0 v${h} a${w / 2},8 0 0,1 ${-w},0 z` }, group);
  svg("path", { class: "can", d: `M0,8 a${w / 2},8 0 0,0 ${w},0` }, group);
  const sessions = server.health && typeof server.health.sessions === "number" ? server.health.sessions : "?";
  text(group, w / 2, 36, lost ? "lost" : `${sessions} session${sessions === 1 ? "" : "s"}`, "big", "middle");
  text(group, w / 2, 54, backend === "local" ? "memory" : "copy", "role", "middle");
}

function drawCan(layer, node, y, primary, redis) {
  const dead = node.pid === null;
  const group = svg("g", { class: "store" + (dead ? " dead" : ""), transform: `translate(${COL.store},${y})`, "data-redis": node.name }, layer);
  const w = COL.storeW, h = 66;
  svg("path", { class: "can", d: `M0,10 a${w / 2},10 0 0,1 ${w},0 v${h} a${w / 2},10 0 0,1 ${-w},0 z` }, group);
  svg("path", { class: "can", d: `M0,10 a${w / 2},10 0 0,0 ${w},0` }, group);
  text(group, w / 2, 38, node.external ? "Redis" : node.name, "big", "middle");
  const role = dead ? "down" : node.external ? "external" : primary ? "primary" : "replica";
  text(group, w / 2, 56, role, "role", "middle");
  if (dead && redis) {
    button(group, 14, h + 18, w - 28, "restart", { "data-action": "restart-redis", "data-target": node.name });
  }
}

function renderBalancer(geo) {
  const layer = document.getElementById("layer-lb");
  layer.replaceChildren();
  const group = svg("g", { class: "lb", transform: `translate(${COL.lb},${geo.lbY})` }, layer);
  const audit = decisionAudit(state.status.strategy_counters || {});
  svg("rect", { class: "box", width: COL.lbW, height: audit ? 194 : 176, rx: 12 }, group);
  text(group, 14, 26, "balancer", "title");
  text(group, 14, 48, state.status.strategy, "big");
  const total = [...state.rates.values()].reduce((a, b) => a + b, 0);
  text(group, 14, 72, `${total.toFixed(1)} req/s`, "big");
  const routes = state.status.counters.routes;
  text(group, 14, 94, `new ${routes.new} · pinned ${routes.pinned}`, "small");
  text(group, 14, 112, `redispatched ${routes.redispatched} · retried ${routes.retried}`, "small");
  text(group, 14, 130, `forged cookies ${routes["forged-cookie"]}`, "small");
  const tunnels = state.status.tunnels || { open: 0 };
  const open = text(group, 14, 148, `websockets: ${tunnels.open} open`, "small");
  open.dataset.field = "tunnels";
  const settings = text(group, 14, 166, strategySettings(state.status.strategy_settings || {}), "small");
  settings.setAttribute("data-strategy-settings", "");
  if (audit) text(group, 14, 184, audit, "small").setAttribute("data-strategy-counters", "");
}

function decisionAudit(counters) {
  // Bounded loads, judged where they act: routing decisions over their bound, and the worst load / mean (max).
  if (counters.decisions === undefined) return "";
  const worst = counters.decision_imbalance_max == null ? "" : ` · max ${counters.decision_imbalance_max.toFixed(2)}x`;
  return (counters.bound_violations == null ? "no bound" : `over bound ${counters.bound_violations}`) + worst;
}

function strategySettings(settings) {
  // What shapes the routing beyond the strategy's name: the sticky mode, the bounded-load factor.
  const parts = [];
  if (settings.sticky_mode) parts.push(`mode ${settings.sticky_mode}`);
  if (settings.balance_factor !== undefined) {
    parts.push(settings.balance_factor ? `balance factor ${settings.balance_factor}%` : "balance factor off");
  }
  return parts.join(" · ");
}

function serverState(server) {
  if (state.killed.has(server.id)) return "killed";
  const managed = state.topology && state.topology.servers.find((s) => s.id === server.id);
  if (managed && managed.pid === null) return "killed";
  if (!server.healthy) return "down";
  return server.draining ? "draining" : "up";
}

function renderServers(geo, backend) {
  const layer = document.getElementById("layer-servers");
  const seen = new Set();
  const maxRate = Math.max(1, ...state.rates.values());
  for (const server of state.status.servers) {
    seen.add(server.id);
    let group = layer.querySelector(`g[data-server="${CSS.escape(server.id)}"]`);
    if (!group) group = buildServer(layer, server.id);
    updateServer(group, server, geo, backend, maxRate);
  }
  for (const group of [...layer.children]) if (!seen.has(group.dataset.server)) group.remove();
}

function buildServer(layer, id) {
  // Built once, then updated in place: a box rebuilt every second would swallow clicks.
  const group = svg("g", { class: "server", "data-server": id }, layer);
  group.tip = svg("title", {}, group); // the hover text: why it is down, or its last check
  const w = COL.serverW;
  svg("rect", { class: "box", width: w, height: 104, rx: 12 }, group);
  svg("circle", { class: "led", cx: 18, cy: 21, r: 6 }, group);
  text(group, 32, 26, id, "title");
  group.stateText = text(group, COL.serverW - 12, 26, "", "state", "end");
  group.rateText = text(group, 14, 50, "", "big rate");
  group.rateText.dataset.field = "rate";
  group.totalText = text(group, 14, 68, "", "small");
  group.totalText.dataset.field = "requests";
  svg("path", { class: "memory", d: "M14,76 a6,2.5 0 0,1 12,0 v9 a6,2.5 0 0,1 -12,0 z" }, group);
  group.sessionsText = text(group, 32, 86, "", "small");
  group.sessionsText.dataset.field = "sessions";
  svg("rect", { class: "bar-bg", x: 14, y: 94, width: w - 28, height: 4, rx: 2 }, group);
  group.bar = svg("rect", { class: "bar", x: 14, y: 94, width: 0, height: 4, rx: 2 }, group);
  const killBtn = button(group, w - 70, 36, 58, "kill", { "data-action": "kill", "data-target": id, class: "svg-button danger" });
  const restartBtn = button(group, w - 70, 64, 58, "restart", { "data-action": "restart", "data-target": id });
  group.controls = [killBtn, restartBtn];
  return group;
}

function updateServer(group, server, geo, backend, maxRate) {
  const current = serverState(server);
  group.setAttribute("class", "server " + current);
  group.dataset.state = current;
  group.setAttribute("transform", `translate(${COL.server},${geo.serverY.get(server.id)})`);
  group.stateText.textContent = current;
  const check = server.last_check ? `last check: ${server.last_check.result}` : "no check yet";
  group.tip.textContent = server.down_reason ? `${server.id} down: ${server.down_reason}` : `${server.id}: ${check}`;
  const rate = current === "up" || current === "draining" ? state.rates.get(server.id) || 0 : 0;
  group.rateText.textContent = `${rate.toFixed(1)} req/s`;
  group.totalText.textContent = `${server.requests} req · ${server.in_flight} in flight`;
  const sessions = server.health && typeof server.health.sessions === "number" && current !== "killed" ? server.health.sessions : null;
  const held = backend === "cookie" ? "sessions: in cookies" : "sessions: ?";
  group.sessionsText.textContent = sessions === null ? held : `${sessions} session${sessions === 1 ? "" : "s"}`;
  group.bar.setAttribute("width", Math.round((COL.serverW - 28) * Math.min(1, rate / maxRate)));
  const [killBtn, restartBtn] = group.controls;
  killBtn.style.display = state.topology && current !== "killed" ? "" : "none";
  restartBtn.style.display = state.topology ? "" : "none";
}

export function renderClients() {
  const geo = state.geometry;
  if (!geo) return;
  const layer = document.getElementById("layer-clients");
  layer.replaceChildren();
  const clients = [...state.clients.values()].reverse();
  const slotH = (geo.height - geo.top - 10) / MAX_CLIENTS;
  const lbMid = geo.lbY + 70;
  state.clientY = new Map();
  clients.forEach((client, i) => {
    const y = geo.top + i * slotH + (slotH - CLIENT_H) / 2;
    const mid = y + CLIENT_H / 2;
    state.clientY.set(client.key, mid);
    svg("path", { class: "edge", d: `M${COL.client + COL.clientW},${mid} C${COL.client + COL.clientW + 50},${mid} ${COL.lb - 50},${lbMid} ${COL.lb},${lbMid}` }, layer);
    const group = svg("g", { class: "client", transform: `translate(${COL.client},${y})`, "data-client": client.key }, layer);
    svg("rect", { class: "box", width: COL.clientW, height: CLIENT_H, rx: 10 }, group);
    text(group, 12, 20, clientLabel(client), "big");
    const last = client.server ? `last: ${client.status} from ${client.server}` : `last: ${client.status} from the balancer`;
    text(group, 12, 37, last + (client.reason ? ` · ${client.reason}` : ""), "small outcome-" + outcome(client.status));
    const counts = [`${client.ok} ok`, client.relogin && `${client.relogin} asked to log in`, client.error && `${client.error} errors`];
    text(group, 12, 53, counts.filter(Boolean).join(" · "), "small");
  });
  if (!clients.length) text(layer, COL.client, geo.middle, "waiting for requests…", "small");
}

export function renderTallies() {
  for (const key of ["requests", "ok", "relogin", "error", "dropped"]) {
    document.getElementById("count-" + key).textContent = state.tally[key];
  }
}

export function logEvent(event, kind) {
  const body = document.querySelector("#event-log tbody");
  const row = document.createElement("tr");
  row.className = kind;
  const time = new Date(event.t * 1000).toLocaleTimeString([], { hour12: false });
  const who = event.user ? state.names.get(event.user) || event.user : event.client;
  const cells = [time, who, `${event.method || ""} ${event.path || ""}`, event.server || "balancer", event.reason || "", event.status];
  for (const value of cells) {
    const cell = document.createElement("td");
    cell.textContent = value;
    row.appendChild(cell);
  }
  if (event.user) row.children[1].dataset.user = event.user;
  row.lastChild.className = "status";
  body.prepend(row);
  while (body.children.length > LOG_ROWS) body.lastChild.remove();
}

// ------------------------------------------------------------------ animation

export function animate(event, key, kind) {
  const geo = state.geometry;
  const root = document.getElementById("diagram");
  if (!geo || state.dots >= MAX_DOTS || document.hidden) return;
  const startY = (state.clientY && state.clientY.get(key)) || geo.middle;
  const lbMid = geo.lbY + 70;
  const points = [[COL.client + COL.clientW, startY], [COL.lb, lbMid], [COL.lb + COL.lbW, lbMid]];
  const target = event.server && geo.serverY.has(event.server) && event.by === "upstream";
  if (target) points.push([COL.server, serverCenterY(geo, event.server)]);
  const dot = svg("circle", { class: "req outcome-" + kind, r: 7, cx: points[0][0], cy: points[0][1] }, document.getElementById("layer-dots"));
  state.dots += 1;
  root.dataset.animations = String(Number(root.dataset.animations) + 1);
  const started = performance.now();
  const step = (now) => {
    const progress = Math.min(1, (now - started) / DOT_MS);
    const [x, y] = along(points, Math.min(1, progress / 0.85));
    dot.setAttribute("cx", x);
    dot.setAttribute("cy", y);
    dot.setAttribute("opacity", progress < 0.85 ? 1 : (1 - progress) / 0.15);
    if (progress < 1) return requestAnimationFrame(step);
    dot.remove();
    state.dots -= 1;
    if (target) flash(event.server, kind);
  };
  requestAnimationFrame(step);
}

function along(points, progress) {
  const lengths = points.slice(1).map((p, i) => Math.hypot(p[0] - points[i][0], p[1] - points[i][1]));
  let left = progress * lengths.reduce((a, b) => a + b, 0);
  for (let i = 0; i < lengths.length; i++) {
    if (left <= lengths[i] || i === lengths.length - 1) {
      const f = lengths[i] ? Math.min(1, left / lengths[i]) : 1;
      return [points[i][0] + (points[i + 1][0] - points[i][0]) * f, points[i][1] + (points[i + 1][1] - points[i][1]) * f];
    }
    left -= lengths[i];
  }
  return points[points.length - 1];
}

function flash(serverId, kind) {
  const group = document.querySelector(`#layer-servers g[data-server="${CSS.escape(serverId)}"]`);
  if (!group) return;
  group.classList.add("flash-" + kind);
  setTimeout(() => group.classList.remove("flash-" + kind), 250);
}
