//! The dashboard: server-rendered pages with a little inline script that refreshes them
//! every two seconds. Everything is served by the hub (no CDN). Pages show metadata only;
//! a message's content is shown only when asked for, and each such view is logged.

use std::sync::Arc;

use axum::extract::{Form, Path, State};
use axum::http::header;
use axum::http::request::Parts;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::api::{agent_view, ApiCaller, ApiError};
use crate::store::{MessageFilter, StoredMessage};
use crate::HubState;

const COOKIE: &str = "outpost_key";

/// The dashboard's routes.
pub fn routes() -> Router<Arc<HubState>> {
    Router::new()
        .route("/", get(fleet_page))
        .route("/login", get(login_page).post(login))
        .route("/agents/{id}", get(agent_page))
        .route("/agents/{id}/messages/{cursor}", get(message_page))
        .route("/dashboard/fleet.json", get(fleet_json))
        .route("/dashboard/agent/{id}", get(agent_json))
}

/// The API key held in the dashboard's cookie.
pub fn session_key(parts: &Parts) -> Option<String> {
    let cookies = parts.headers.get(header::COOKIE)?.to_str().ok()?;
    cookies.split(';').find_map(|c| {
        c.trim()
            .strip_prefix(&format!("{COOKIE}="))
            .map(str::to_owned)
    })
}

async fn login_page() -> Html<String> {
    Html(page(
        "Sign in",
        r#"<form method="post" action="/login"><label>Staff token or API key <input name="key" type="password" autofocus size="60"></label> <button>Sign in</button></form>
<p class="muted">Staff sign in with their personal token (<code>outpost hub staff add NAME</code>) to run support jobs and read audit trails; API keys (<code>outpost hub apikey create --name NAME</code>) see the fleet and messages.</p>"#,
        "",
    ))
}

#[derive(Deserialize)]
struct LoginForm {
    key: String,
}

async fn login(State(state): State<Arc<HubState>>, Form(form): Form<LoginForm>) -> Response {
    let key = form.key.trim().to_owned();
    let hash = crate::secrets::hash_secret(&key);
    let valid = matches!(state.store.api_key(&hash).await, Ok(Some(_)))
        || matches!(state.store.staff_by_token(&hash).await, Ok(Some(_)));
    let is_safe = key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid || !is_safe {
        return Html(page("Sign in", "<p class=\"bad\">That staff token or API key is not valid.</p><p><a href=\"/login\">Try again</a></p>", "")).into_response();
    }
    let cookie = format!("{COOKIE}={key}; Path=/; HttpOnly; Secure; SameSite=Lax");
    ([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response()
}

#[derive(Serialize)]
struct FleetRow {
    id: String,
    name: String,
    online: bool,
    version: String,
    hostname: String,
    last_seen_ms: Option<i64>,
    queue_depth: u64,
    dead_letters: u64,
    last_error: String,
    connectors: Vec<(String, String)>,
}

async fn fleet_rows(state: &HubState) -> Result<Vec<FleetRow>, ApiError> {
    let agents = state.store.agents().await?;
    Ok(agents
        .into_iter()
        .filter(|a| a.revoked_at_ms.is_none())
        .map(|a| {
            let view = agent_view(state, a);
            let value = serde_json::to_value(&view).unwrap_or_default();
            let inventory = value.get("inventory").cloned().unwrap_or_default();
            let text = |v: &serde_json::Value, k: &str| {
                v.get(k).and_then(|x| x.as_str()).unwrap_or("").to_owned()
            };
            let queues = inventory
                .get("queues")
                .and_then(|q| q.as_array())
                .cloned()
                .unwrap_or_default();
            let connectors = inventory
                .get("connectors")
                .and_then(|c| c.as_array())
                .cloned()
                .unwrap_or_default();
            let sum = |key: &str| {
                queues
                    .iter()
                    .filter_map(|q| q.get(key).and_then(|n| n.as_u64()))
                    .sum::<u64>()
            };
            FleetRow {
                id: text(&value, "id"),
                name: text(&value, "name"),
                online: value
                    .get("online")
                    .and_then(|o| o.as_bool())
                    .unwrap_or(false),
                version: text(&inventory, "version"),
                hostname: text(&value, "hostname"),
                last_seen_ms: value.get("last_seen_ms").and_then(|n| n.as_i64()),
                queue_depth: sum("pending"),
                dead_letters: sum("dead"),
                last_error: connectors
                    .iter()
                    .find_map(|c| {
                        c.get("last_error")
                            .and_then(|e| e.as_str())
                            .map(str::to_owned)
                    })
                    .unwrap_or_default(),
                connectors: connectors
                    .iter()
                    .map(|c| (text(c, "name"), text(c, "state")))
                    .collect(),
            }
        })
        .collect())
}

async fn fleet_json(
    _caller: ApiCaller,
    State(state): State<Arc<HubState>>,
) -> Result<Json<Vec<FleetRow>>, ApiError> {
    Ok(Json(fleet_rows(&state).await?))
}

async fn fleet_page(
    caller: Result<ApiCaller, ApiError>,
    State(state): State<Arc<HubState>>,
) -> Result<Response, ApiError> {
    if caller.is_err() {
        return Ok(Redirect::to("/login").into_response());
    }
    let rows = fleet_rows(&state).await?;
    let initial = script_json(&rows);
    let body = r#"<table><thead><tr><th>Site</th><th>State</th><th>Version</th><th>Last heartbeat</th><th>Queue depth</th><th>Dead letters</th><th>Connectors</th><th>Last error</th></tr></thead><tbody id="fleet"></tbody></table>"#;
    let script = format!(
        r#"const render = rows => {{ document.getElementById('fleet').innerHTML = rows.map(r => `<tr>
<td><a href="/agents/${{enc(r.id)}}">${{esc(r.name)}}</a><div class="muted">${{esc(r.hostname)}}</div></td>
<td class="${{r.online ? 'ok' : 'bad'}}">${{r.online ? 'online' : 'offline'}}</td><td>${{esc(r.version)}}</td><td>${{ago(r.last_seen_ms)}}</td>
<td>${{r.queue_depth}}</td><td class="${{r.dead_letters ? 'bad' : ''}}">${{r.dead_letters}}</td>
<td>${{r.connectors.map(c => `${{esc(c[0])}}: ${{esc(c[1])}}`).join('<br>')}}</td><td>${{esc(r.last_error)}}</td></tr>`).join('') || '<tr><td colspan=8 class="muted">No agents enrolled yet.</td></tr>'; }};
render({initial});
setInterval(() => fetch('/dashboard/fleet.json').then(r => r.json()).then(render).catch(() => {{}}), 2000);"#
    );
    Ok(Html(page("Fleet", body, &script)).into_response())
}

#[derive(Serialize)]
struct AgentPage {
    agent: serde_json::Value,
    messages: Vec<StoredMessage>,
    /// Newest support jobs (states and PHI-free summaries).
    jobs: Vec<crate::store::JobRecord>,
    /// Where the audit mirror stands, and any gap or fork found.
    mirror: crate::store::MirrorState,
}

/// An agent's page data; support jobs only for staff (apps see fleet health and messages).
async fn agent_data(state: &HubState, id: &str, is_staff: bool) -> Result<AgentPage, ApiError> {
    let agent = state.store.agent(id).await?.ok_or_else(|| {
        ApiError::new(
            axum::http::StatusCode::NOT_FOUND,
            "not_found",
            format!("no agent {id:?}"),
        )
    })?;
    let messages = state.store.recent_messages(id, 50).await?;
    let jobs = if is_staff {
        state.store.recent_jobs(id, 20).await?
    } else {
        Vec::new()
    };
    let mirror = state.store.mirror_state(id).await?;
    let agent = serde_json::to_value(agent_view(state, agent)).unwrap_or_default();
    Ok(AgentPage {
        agent,
        messages,
        jobs,
        mirror,
    })
}

async fn agent_json(
    caller: ApiCaller,
    State(state): State<Arc<HubState>>,
    Path(id): Path<String>,
) -> Result<Json<AgentPage>, ApiError> {
    let is_staff = caller.principal.starts_with("staff:");
    Ok(Json(agent_data(&state, &id, is_staff).await?))
}

async fn agent_page(
    caller: Result<ApiCaller, ApiError>,
    State(state): State<Arc<HubState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let Ok(caller) = caller else {
        return Ok(Redirect::to("/login").into_response());
    };
    let data = agent_data(&state, &id, caller.principal.starts_with("staff:")).await?;
    let initial = script_json(&data);
    let body = r#"<p><a href="/">&larr; Fleet</a></p><h2 id="title"></h2><div id="summary"></div>
<h3>Connectors</h3><table><thead><tr><th>Name</th><th>Role</th><th>Kind</th><th>State</th><th>Items</th><th>Failures</th><th>Detail</th><th>Last error</th></tr></thead><tbody id="connectors"></tbody></table>
<h3>Queues</h3><table><thead><tr><th>Sink</th><th>Pending</th><th>Retrying</th><th>Dead</th></tr></thead><tbody id="queues"></tbody></table>
<h3>Recent messages</h3><p class="muted">Metadata only. Opening a message shows patient data and is recorded.</p>
<table><thead><tr><th>Cursor</th><th>Received</th><th>Source</th><th>Type</th><th>Control id</th><th></th></tr></thead><tbody id="messages"></tbody></table>
<h3>Support jobs</h3><form id="jobform">Run <select id="capability"><option>health</option><option>logs.tail</option><option>logs.search</option><option>diagnostics</option><option>connector.restart</option><option>connector.pause</option><option>connector.resume</option><option>files.list</option><option>files.read</option><option>files.write</option><option>config.propose</option></select>
with arguments <input id="jobargs" value="{}" size="50"> <button>Run</button> <span id="jobmsg" class="muted">Needs a staff sign-in; the practice's policy decides.</span></form>
<table><thead><tr><th>Job</th><th>Capability</th><th>Staff</th><th>State</th><th>Rule</th><th>Summary / reason</th><th>Approver</th><th></th></tr></thead><tbody id="jobs"></tbody></table>
<pre id="output" hidden></pre>
<h3>Audit trail</h3><div id="mirror"></div><p><button id="showaudit">Show the audit trail</button> <span class="muted">Viewing it is recorded with your name.</span></p><table><tbody id="audit"></tbody></table>"#;
    let script = format!(
        r#"const id = {id};
const render = d => {{ const a = d.agent, inv = a.inventory || {{}};
document.getElementById('title').textContent = a.name + ' (' + a.id + ')';
document.getElementById('summary').innerHTML = `<span class="${{a.online ? 'ok' : 'bad'}}">${{a.online ? 'online' : 'offline'}}</span> · version ${{esc(inv.version || '?')}} · host ${{esc(a.hostname)}} · last heartbeat ${{ago(a.last_seen_ms)}} · clock skew ${{inv.clock_skew_ms ?? '?'}} ms · disk free ${{inv.disk_free_bytes ? (inv.disk_free_bytes/1073741824).toFixed(1) + ' GiB' : '?'}}`;
document.getElementById('connectors').innerHTML = (inv.connectors || []).map(c => `<tr><td>${{esc(c.name)}}</td><td>${{esc(c.role)}}</td><td>${{esc(c.kind)}}</td><td>${{esc(c.state)}}</td><td>${{c.items}}</td><td>${{c.failures}}</td><td>${{esc(c.detail || '')}}</td><td>${{esc(c.last_error || '')}}</td></tr>`).join('');
document.getElementById('queues').innerHTML = (inv.queues || []).map(q => `<tr><td>${{esc(q.sink)}}</td><td>${{q.pending}}</td><td>${{q.retrying}}</td><td>${{q.dead}}</td></tr>`).join('');
document.getElementById('messages').innerHTML = d.messages.map(m => `<tr><td>${{m.cursor}}</td><td>${{new Date(m.received_at_ms).toLocaleString()}}</td><td>${{esc(m.source)}}</td><td>${{esc(m.msg_type || '')}}</td><td>${{esc(m.control_id || '')}}</td><td><a href="/agents/${{enc(a.id)}}/messages/${{m.cursor}}">show content</a></td></tr>`).join(''); }};
document.getElementById('jobs').innerHTML = d.jobs.map(j => `<tr><td>${{esc(j.id)}}</td><td>${{esc(j.capability)}}</td><td>${{esc(j.staff)}}</td><td class="${{j.state === 'done' ? 'ok' : (['refused','failed','denied','expired'].includes(j.state) ? 'bad' : '')}}">${{esc(j.state)}}</td><td>${{esc(j.rule || '')}}</td><td>${{esc(j.summary || j.reason || '')}}</td><td>${{esc(j.approver || '')}}</td><td><a href="" data-job="${{esc(j.id)}}">output</a></td></tr>`).join('');
const m = d.mirror; document.getElementById('mirror').innerHTML = m.problem ? `<p class="bad">Audit mirror problem: ${{esc(m.problem)}}</p>` : `<p class="ok">Audit mirror intact: ${{m.last_seq}} entries</p>`; }};
document.getElementById('jobform').addEventListener('submit', e => {{ e.preventDefault(); let args; try {{ args = JSON.parse(document.getElementById('jobargs').value || '{{}}'); }} catch (err) {{ document.getElementById('jobmsg').textContent = 'arguments are not JSON'; return; }}
fetch('/api/v1/jobs', {{method: 'POST', headers: {{'content-type': 'application/json'}}, body: JSON.stringify({{agents: [id], capability: document.getElementById('capability').value, args}})}}).then(r => r.json()).then(b => document.getElementById('jobmsg').textContent = b.rollout ? 'submitted ' + b.jobs[0].id : (b.message || 'failed')); }});
document.getElementById('jobs').addEventListener('click', e => {{ const job = e.target.dataset && e.target.dataset.job; if (!job) return; e.preventDefault();
fetch('/api/v1/jobs/' + enc(job) + '/output').then(r => r.json()).then(p => {{ const o = document.getElementById('output'); o.hidden = false; o.textContent = (p.chunks || []).map(c => c.data).join('') || (p.message || '(no output)'); }}); }});
document.getElementById('showaudit').addEventListener('click', () => fetch('/api/v1/agents/' + enc(id) + '/audit?limit=100').then(r => r.json()).then(t => {{ document.getElementById('audit').innerHTML = (t.lines || []).map(l => {{ let e = {{}}; try {{ e = JSON.parse(l.line); }} catch (err) {{}} return `<tr><td>${{l.seq}}</td><td>${{new Date(e.time_ms).toLocaleString()}}</td><td>${{esc(e.event)}}</td><td>${{esc(e.staff || '')}}</td><td>${{esc(e.capability || '')}}</td><td>${{esc(e.decision || '')}} ${{esc(e.rule || '')}}</td><td>${{esc(e.approver || '')}}</td><td>${{esc(e.result_summary || e.detail || '')}}</td></tr>`; }}).join('') || `<tr><td>${{esc(t.message || 'empty')}}</td></tr>`; }}));
render({initial});
setInterval(() => fetch('/dashboard/agent/' + enc(id)).then(r => r.json()).then(render).catch(() => {{}}), 2000);"#,
        id = serde_json::to_string(&id).unwrap_or_else(|_| "\"\"".into())
    );
    Ok(Html(page("Agent", body, &script)).into_response())
}

async fn message_page(
    caller: ApiCaller,
    State(state): State<Arc<HubState>>,
    Path((id, cursor)): Path<(String, i64)>,
) -> Result<Response, ApiError> {
    let filter = MessageFilter {
        after: cursor - 1,
        limit: 1,
        agent_id: Some(id.clone()),
        with_payload: true,
        ..MessageFilter::default()
    };
    let message = state
        .store
        .messages(&filter)
        .await?
        .into_iter()
        .find(|m| m.cursor == cursor);
    let Some(message) = message else {
        return Err(ApiError::new(
            axum::http::StatusCode::NOT_FOUND,
            "not_found",
            format!("no message {cursor} from agent {id}"),
        ));
    };
    tracing::info!(target: "audit", viewer = %caller.name, agent_id = %id, cursor, control_id = message.control_id.as_deref().unwrap_or(""), "message content viewed on the dashboard");
    crate::api::record_access(
        &state,
        &caller.principal,
        "message.payload",
        &format!("agent {id} cursor {cursor}"),
    )
    .await?;
    let bytes = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .decode(message.payload_base64.as_deref().unwrap_or(""))
            .unwrap_or_default()
    };
    let text = String::from_utf8_lossy(&bytes).replace('\r', "\n");
    let body = format!(
        "<p><a href=\"/agents/{agent}\">&larr; Agent</a></p><p class=\"muted\">Viewed by {viewer}; this view is recorded.</p><pre>{text}</pre>",
        agent = esc(&id),
        viewer = esc(&caller.name),
        text = esc(&text)
    );
    Ok(Html(page("Message", &body, "")).into_response())
}

/// JSON safe to embed in a `<script>` block: `<` is escaped so that no string from an
/// agent's inventory can close the script element.
fn script_json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value)
        .unwrap_or_else(|_| "null".into())
        .replace('<', "\\u003c")
}

/// Escapes text for HTML.
fn esc(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

fn page(title: &str, body: &str, script: &str) -> String {
    format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{title} · Outpost hub</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font:14px system-ui,sans-serif;margin:1.5rem;color:#222}}table{{border-collapse:collapse;width:100%}}th,td{{text-align:left;padding:.35rem .6rem;border-bottom:1px solid #ddd;vertical-align:top}}
th{{background:#f4f4f4}}.ok{{color:#16794a;font-weight:600}}.bad{{color:#b3261e;font-weight:600}}.muted{{color:#777;font-size:12px}}pre{{background:#f7f7f7;padding:1rem;overflow:auto}}</style></head>
<body><h1>Outpost hub · {title}</h1>{body}
<script>
const esc = s => String(s ?? '').replace(/[&<>"']/g, c => ({{'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;',"'":'&#39;'}})[c]);
const enc = encodeURIComponent;
const ago = ms => ms ? Math.max(0, Math.round((Date.now() - ms) / 1000)) + ' s ago' : 'never';
{script}
</script></body></html>"#,
        title = esc(title)
    )
}
