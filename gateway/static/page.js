// The gateway's demo page: one user's history and recommendations; "watched" records an interaction.
// Everything comes from this origin (no CDN): the gateway's /v1 routes.
"use strict";

const $ = (id) => document.getElementById(id);
const HISTORY = 10;

function text(tag, value, className) {
  const node = document.createElement(tag);
  node.textContent = value;
  if (className) node.className = className;
  return node;
}

function genres(list) {
  const cell = document.createElement("td");
  for (const genre of list) cell.appendChild(text("span", genre, "genre"));
  return cell;
}

function status(message, isError) {
  $("status").textContent = message;
  $("status").className = isError ? "error" : "";
}

async function problemText(response) {
  try {
    const body = await response.json();
    return `${response.status} ${body.title}: ${body.detail}`;
  } catch (error) {
    return `${response.status} ${response.statusText}`;
  }
}

function showMeta(body, roundTripMs) {
  $("meta").hidden = false;
  $("ranking-version").textContent = body.ranking_version;
  $("retrieval-version").textContent = body.retrieval_version;
  $("latency").textContent = body.latency_ms.toFixed(1);
  $("roundtrip").textContent = roundTripMs.toFixed(1);
  $("request-id").textContent = body.request_id;
  const flags = $("degraded");
  flags.replaceChildren(...(body.degraded.length ? body.degraded.map((f) => text("span", f, "flag"))
                                                 : [text("span", "no degraded path", "muted")]));
}

function showItems(user, items) {
  const rows = items.map((item, i) => {
    const row = document.createElement("tr");
    row.dataset.itemId = item.item_id;
    row.append(text("td", i + 1), text("td", item.title || `item ${item.item_id}`, "title"), genres(item.genres),
               text("td", item.score.toFixed(4), "num"), text("td", item.ctr.toFixed(4), "num"),
               text("td", item.predicted_rating.toFixed(2), "num"), text("td", item.retrieval_score.toFixed(3), "num"));
    const cell = document.createElement("td");
    const button = text("button", "watched");
    button.addEventListener("click", () => watched(user, item));
    cell.appendChild(button);
    row.appendChild(cell);
    return row;
  });
  $("recommendations").tBodies[0].replaceChildren(...rows);
}

function showHistory(history) {
  const rows = history.map((entry) => {
    const li = document.createElement("li");
    li.dataset.itemId = entry.item_id;
    li.append(text("span", entry.title || `item ${entry.item_id}`, "title"), document.createElement("br"));
    for (const genre of entry.genres) li.appendChild(text("span", genre, "genre"));
    const when = new Date(entry.timestamp_s * 1000).toISOString().replace("T", " ").slice(0, 16) + " UTC";
    li.append(" ", text("span", when, "when"));
    if (entry.fresh) li.append(" ", text("span", "just recorded", "fresh"));
    return li;
  });
  $("history").replaceChildren(...(rows.length ? rows : [text("li", "no history for this user", "muted")]));
}

async function recommend() {
  const user = $("user").value.trim();
  if (!user) return;
  const params = new URLSearchParams({k: $("k").value, diversity: $("diversity").value, history: HISTORY});
  status(`asking for user ${user}...`);
  const started = performance.now();
  const response = await fetch(`/v1/users/${encodeURIComponent(user)}/recommendations?${params}`);
  const roundTrip = performance.now() - started;
  if (!response.ok) {
    status(await problemText(response), true);
    return;
  }
  const body = await response.json();
  showMeta(body, roundTrip);
  showItems(user, body.items);
  showHistory(body.history);
  status(`${body.items.length} recommendations for user ${user}`);
  remember(user);
}

async function watched(user, item) {
  const response = await fetch("/v1/interactions", {
    method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify({interactions: [{user_id: user, item_id: item.item_id}]}),
  });
  if (!response.ok) {
    status(await problemText(response), true);
    return;
  }
  await recommend();
  status(`recorded: user ${user} watched "${item.title || item.item_id}"; the list is updated`);
}

function remember(user) {
  const known = [...$("users").options].map((o) => o.value);
  if (!known.includes(user)) $("users").appendChild(new Option(user, user));
}

for (let i = 1; i <= 10; i++) $("users").appendChild(new Option(String(i), String(i)));
$("ask").addEventListener("submit", (event) => { event.preventDefault(); recommend(); });
$("random").addEventListener("click", () => { $("user").value = String(1 + Math.floor(Math.random() * 50)); recommend(); });
$("diversity").addEventListener("input", () => { $("diversity-value").textContent = $("diversity").value; });
