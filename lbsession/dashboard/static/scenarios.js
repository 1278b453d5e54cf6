// The "Run a scenario" panel: plays a file of configs/scenarios/ against this lab (POST /scenarios)
// and shows its counters as they change (GET /scenarios/current). Its requests animate like any others.

import { state } from "./model.js";
import { backendName } from "./diagram.js";

const RUNNING_EVERY_MS = 500;
const IDLE_EVERY_MS = 1500; // a run started elsewhere (curl, another tab) shows up here too

const scenarios = new Map(); // name -> what GET /scenarios says of it
let api = null;
let toast = null;
let running = false;

const $ = (id) => document.getElementById(id);

export async function startScenarios(apiCall, toastCall) {
  [api, toast] = [apiCall, toastCall];
  try {
    fill((await api("GET", "/scenarios")).scenarios);
  } catch (err) {
    // 404: a bare `lbsession lb`, no lab to play a scenario against: the panel stays hidden.
    if (err.status !== 404) setTimeout(() => startScenarios(apiCall, toastCall), 3000);
    return;
  }
  $("scenario-card").hidden = false;
  $("scenario-select").addEventListener("change", describe);
  $("scenario-form").addEventListener("submit", (event) => { event.preventDefault(); run(); });
  describe();
  poll();
}

function label(scenario) {
  return `${scenario.claim || scenario.name} · ${scenario.title || scenario.name}`;
}

function rank(scenario) {
  // The seed's claims first (C1..C12), then those beyond it (B1..), then files that claim nothing.
  return { C: 0, B: 1 }[(scenario.claim || "-")[0]] ?? 2;
}

function fill(list) {
  const select = $("scenario-select");
  const ordered = [...list].sort((a, b) => rank(a) - rank(b) || a.name.localeCompare(b.name));
  for (const scenario of ordered) {
    if (scenario.error) continue; // a file that does not load: `lbsession scenario NAME` says why
    scenarios.set(scenario.name, scenario);
    const option = document.createElement("option");
    option.value = scenario.name;
    option.textContent = label(scenario);
    select.appendChild(option);
  }
}

function differences(scenario) {
  // Before a run, in the page: the lab changes (strategy, servers) more often than the list is read.
  if (!state.status) return []; // the lab is not known yet (and backendName() needs it): the next poll tells
  const out = [];
  const [backend, ha] = scenario.backend.split(" ");
  if (state.status.strategy !== scenario.strategy) out.push(`strategy ${scenario.strategy} (switch it above)`);
  else {
    const settings = state.status.strategy_settings || {};
    for (const [key, value] of Object.entries(scenario.strategy_settings || {})) {
      if (settings[key] !== value) out.push(`${key.replace("_", " ")} ${value}`);
    }
  }
  if (backendName() && backendName() !== backend) out.push(`backend ${backend} (run the lab with --backend ${backend})`);
  else if (ha && !(state.topology && state.topology.redis && state.topology.redis.ha)) out.push("Redis with failover (--redis-ha)");
  if (state.status.servers.length !== scenario.servers) out.push(`${scenario.servers} servers`);
  return out;
}

function describe() {
  const scenario = scenarios.get($("scenario-select").value);
  if (!scenario) return;
  const faults = scenario.faults.length ? "; " + scenario.faults.join(", ") : "; no fault";
  $("scenario-about").textContent =
    `${scenario.title}. ${scenario.users} users for ${scenario.duration_s} s${faults}.`;
  const diff = differences(scenario);
  const warning = $("scenario-fit");
  warning.hidden = diff.length === 0;
  warning.textContent = `Written for ${diff.join(", ")}: on this lab, its verdict may differ.`;
}

async function run() {
  const name = $("scenario-select").value;
  try {
    show(await api("POST", "/scenarios", { name }));
    toast(`${scenarios.get(name).claim || name} is running against this lab`);
  } catch (err) {
    toast(err.message, true);
  }
  poll();
}

async function poll() {
  clearTimeout(poll.timer);
  try {
    show(await api("GET", "/scenarios/current"));
  } catch (err) { /* the admin API is unreachable: the stream pill says so; try again */ }
  describe();
  poll.timer = setTimeout(poll, running ? RUNNING_EVERY_MS : IDLE_EVERY_MS);
}

function number(value, digits) {
  if (value === null || value === undefined) return "–";
  return digits === undefined ? String(value) : value.toFixed(digits);
}

function show(current) {
  running = current.state === "running";
  $("scenario-run").disabled = running;
  const box = $("scenario-status");
  box.hidden = current.state === "idle";
  box.dataset.state = current.state;
  if (current.state === "idle") return;
  $("scenario-name").textContent = label(current);
  $("scenario-requests").textContent = number(current.requests);
  $("scenario-relogins").textContent = number(current.relogins);
  $("scenario-imbalance").textContent = number(current.imbalance, 2);
  $("scenario-faults").textContent = `${current.faults_applied}/${current.faults.length}`;
  const done = current.state !== "running";
  const share = done ? 1 : Math.min(1, current.elapsed_s / current.duration_s);
  $("scenario-bar").style.width = `${Math.round(share * 100)}%`;
  const verdict = $("scenario-verdict");
  verdict.textContent = current.state === "done" ? current.verdict
    : current.state === "failed" ? "failed" : `${current.elapsed_s.toFixed(1)} / ${current.duration_s} s`;
  const verdictClass = { PASS: "pass", FAIL: "fail" }[current.verdict] || "none"; // "-": the scenario claims nothing
  verdict.className = "verdict " + (current.state === "done" ? verdictClass : current.state);
  showOutcome(current);
}

function fact(value, what) {
  const node = document.createElement("span");
  node.append(Object.assign(document.createElement("b"), { textContent: value }), " " + what);
  return node;
}

function showOutcome(current) {
  const m = current.metrics;
  $("scenario-detail").replaceChildren(...(m ? [
    fact(`${m.relogin_users} of ${m.users}`, "users logged in again"),
    fact(number(m.errors_5xx), "5xx"),
    fact(number(m.cv, 2), "cv"),
    fact(`${number(m.p50_ms, 1)} / ${number(m.p99_ms, 1)} ms`, "p50 / p99"),
    fact(`${number(m.stall_s, 2)} s`, "longest stall"),
  ] : []));
  const checks = $("scenario-checks");
  checks.replaceChildren();
  for (const check of current.checks || []) {
    const item = document.createElement("li");
    item.className = check.passed ? "pass" : "fail";
    item.title = check.passed ? "as the claim predicts" : "not what the claim predicts";
    item.append(check.expect, Object.assign(document.createElement("b"), { textContent: number(check.measured) }));
    checks.appendChild(item);
  }
  const notes = [...current.notes, ...(current.error ? [current.error] : [])];
  const list = $("scenario-notes");
  list.replaceChildren(...notes.map((note) => Object.assign(document.createElement("li"), { textContent: note })));
}
