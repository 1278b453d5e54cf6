// The dashboard's shared state and the small helpers every part uses.

export const SVGNS = "http://www.w3.org/2000/svg";
export const MAX_CLIENTS = 5;
export const CLIENT_H = 60;
export const MAX_DOTS = 60; // beyond this many requests in flight on screen, count them but do not animate
export const DOT_MS = 1100;
export const LOG_ROWS = 14;
export const WIDTH = 1060;
export const COL = { client: 16, clientW: 196, lb: 330, lbW: 180, server: 600, serverW: 240, store: 880, storeW: 104 };

export const state = {
  status: null,
  topology: undefined, // undefined: not asked yet; null: not a lab (lbsession lb), no process control
  previous: new Map(), // server id -> {requests, t}: for the request rate
  rates: new Map(),
  killed: new Set(), // killed from here, until the topology shows a pid again
  clients: new Map(), // key -> {key, user, ip, status, server, reason, and a count per outcome}
  names: new Map(), // user tag -> demo user name
  primary: null, // the Redis node believed primary, when the topology gives no roles
  links: null, // link name -> link (GET /links), or null: a lab without links
  tally: { requests: 0, ok: 0, relogin: 0, error: 0, other: 0, dropped: 0 },
  dots: 0,
  geometry: null,
};

export function svg(tag, attrs, parent) {
  const node = document.createElementNS(SVGNS, tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  if (parent) parent.appendChild(node);
  return node;
}

export function text(parent, x, y, content, cls, anchor) {
  const node = svg("text", { x, y, class: cls || "" }, parent);
  if (anchor) node.setAttribute("text-anchor", anchor);
  node.textContent = content;
  return node;
}

export function outcome(status) {
  if (status === 401) return "relogin";
  if (status === null || status === undefined || status >= 500) return "error";
  if (status < 400) return "ok";
  return "other";
}

export function clientLabel(client) {
  // At render time: a demo user's name may become known after its first event.
  if (client.user) return state.names.get(client.user) || "session " + client.user;
  return client.ip + ", no cookie";
}
