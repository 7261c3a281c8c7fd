//! `https://login.<domain>/`: the signed-in user's sessions — live, reconnecting, and
//! reserved ones whose job has not started — each with its address, so that a user who
//! lost a URL finds it again (as Open OnDemand's "My Interactive Sessions" does).
//!
//! Access keys are stored only as their SHA-256, so a `link` session's private link cannot
//! be shown again here: its row says so and points at `jobgate jobs` on the login node.

use super::pages::escape;
use crate::access::SessionLock;
use crate::body::RelayBody;
use crate::Shared;
use http::{Response, StatusCode};
use std::fmt::Write as _;
use std::time::Instant;

/// One row of the page.
struct Row {
    name: String,
    job: String,
    node: String,
    state: &'static str,
    since: String,
    link: Option<String>,
}

/// "3 h 12 min", "5 min", "40 s".
fn ago(seconds: u64) -> String {
    match seconds {
        s if s >= 3600 => format!("{} h {} min", s / 3600, (s % 3600) / 60),
        s if s >= 60 => format!("{} min", s / 60),
        s => format!("{s} s"),
    }
}

/// The page for `user`.
pub(crate) fn page(shared: &Shared, user: &str) -> Response<RelayBody> {
    let mut rows = Vec::new();
    for session in shared.routes.sessions_of(user) {
        let link = match session.lock {
            SessionLock::Link { .. } => None,
            SessionLock::Owner | SessionLock::Public => {
                Some(shared.config.session_url(session.name.as_str()))
            }
        };
        rows.push(Row {
            name: session.name.to_string(),
            job: session.job.id.clone().unwrap_or_else(|| "-".into()),
            node: session.job.host.clone().unwrap_or_else(|| "-".into()),
            state: "running",
            since: ago(session.opened.elapsed().as_secs()),
            link,
        });
    }
    let now = Instant::now();
    for (name, parked) in shared.routes.parked() {
        if parked.user == user {
            rows.push(Row {
                name: name.to_string(),
                job: "-".into(),
                node: "-".into(),
                state: "reconnecting",
                since: format!(
                    "ends in {}",
                    ago(parked.until.saturating_duration_since(now).as_secs())
                ),
                link: Some(shared.config.session_url(name.as_str())),
            });
        }
    }
    for record in shared.queued.records() {
        if record.user == user {
            rows.push(Row {
                link: (record.access != "link").then(|| shared.config.session_url(&record.name)),
                name: record.name,
                job: record.job_id,
                node: "-".into(),
                state: "queued",
                since: "-".into(),
            });
        }
    }
    render(user, &rows)
}

fn render(user: &str, rows: &[Row]) -> Response<RelayBody> {
    let mut table = String::new();
    if rows.is_empty() {
        table.push_str("<p>You have no sessions on this relay now.</p>");
    } else {
        table.push_str(
            "<table><tr><th>session</th><th>job</th><th>node</th><th>state</th><th>since</th><th>address</th></tr>",
        );
        for row in rows {
            let address = match &row.link {
                Some(url) => format!("<a href=\"{0}\">{0}</a>", escape(url)),
                None => "private link: <code>jobgate jobs</code> on the login node shows it".into(),
            };
            let _ = write!(
                table,
                "<tr data-session=\"{name}\"><td>{name}</td><td>{job}</td><td>{node}</td><td>{state}</td><td>{since}</td><td>{address}</td></tr>",
                name = escape(&row.name),
                job = escape(&row.job),
                node = escape(&row.node),
                state = row.state,
                since = escape(&row.since),
            );
        }
        table.push_str("</table>");
    }
    let body = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Your sessions · jobgate</title>\
         <style>{style}body{{max-width:60em}}table{{border-collapse:collapse}}td,th{{padding:.2em .8em;text-align:left;border-bottom:1px solid #ddd}}</style></head>\
         <body><h1>Your sessions</h1><p>Signed in as <b>{user}</b>.</p>{table}\
         <p><small><a href=\"/__jobgate/logout\">sign out</a> · jobgate relay</small></p></body></html>\n",
        user = escape(user),
        style = crate::pages::PAGE_STYLE,
    );
    crate::pages::relay_response(StatusCode::OK, "text/html; charset=utf-8", body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_people_say_them() {
        assert_eq!(ago(40), "40 s");
        assert_eq!(ago(300), "5 min");
        assert_eq!(ago(3 * 3600 + 12 * 60 + 5), "3 h 12 min");
    }

    #[test]
    fn names_and_jobs_are_escaped() {
        let response = render(
            "<alice>",
            &[Row {
                name: "n".into(),
                job: "<script>".into(),
                node: "-".into(),
                state: "queued",
                since: "-".into(),
                link: None,
            }],
        );
        let RelayBody::Full(Some(body)) = response.into_body() else {
            panic!("full body");
        };
        let text = String::from_utf8_lossy(&body);
        assert!(
            !text.contains("<script>") && !text.contains("<alice>"),
            "{text}"
        );
    }
}
