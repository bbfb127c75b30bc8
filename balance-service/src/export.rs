//! `GET /admin/charges`: the usage export, paginated by an opaque cursor, as
//! JSON lines, CSV or CloudEvents (docs/balance-service.md, "Usage export").

use super::*;
use crate::store::rules::rfc3339;
use crate::store::{ExportKey, ExportKind, ExportQuery, ExportRow};
use axum::extract::rejection::QueryRejection;
use axum::extract::Query;
use axum::http::header::CONTENT_TYPE;

/// Rows per page unless `limit` says otherwise, and the most a page holds.
const DEFAULT_LIMIT: u64 = 1_000;
const MAX_LIMIT: u64 = 10_000;
/// The answer header with the cursor of the next page.
pub const NEXT_CURSOR: &str = "farebox-next-cursor";
/// The CloudEvents `source` of every event.
const SOURCE: &str = "farebox-balance";
/// The columns of the CSV export (also the JSON lines' field names).
const CSV_COLUMNS: [&str; 12] = [
    "id",
    "type",
    "account_id",
    "request_id",
    "lease_id",
    "route",
    "method",
    "path",
    "units",
    "upstream_status",
    "at",
    "at_ms",
];

#[derive(Deserialize)]
pub(super) struct ExportParams {
    from: Option<String>,
    to: Option<String>,
    account: Option<String>,
    format: Option<String>,
    limit: Option<u64>,
    cursor: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Format {
    JsonLines,
    Csv,
    CloudEvents,
}

/// A cursor: `c1` and the hex of `AT:K:ID` of the last row sent.
fn encode_cursor(k: &ExportKey) -> String {
    let raw = format!("{}:{}:{}", k.at, k.kind.order(), k.id);
    let hex: String = raw.bytes().map(|b| format!("{b:02x}")).collect();
    format!("c1{hex}")
}

fn decode_cursor(s: &str) -> Option<ExportKey> {
    let hex = s.strip_prefix("c1")?;
    if hex.len() % 2 != 0 {
        return None;
    }
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| {
            hex.get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect::<Option<Vec<u8>>>()?;
    let raw = String::from_utf8(bytes).ok()?;
    let mut parts = raw.splitn(3, ':');
    let at = parts.next()?.parse().ok()?;
    let kind = ExportKind::from_order(parts.next()?.parse().ok()?)?;
    let id = parts.next()?.to_owned();
    Some(ExportKey { at, kind, id })
}

fn time_param(name: &str, v: Option<&str>, default: i64) -> Result<i64, String> {
    match v {
        None | Some("") => Ok(default),
        Some(s) => s
            .parse::<jiff::Timestamp>()
            .map(|t| t.as_millisecond())
            .map_err(|_| {
                format!("{name} must be an RFC 3339 time such as 2026-12-01T00:00:00Z, got {s:?}")
            }),
    }
}

/// The export's unique id of a row (`KIND:ID`: a charge and its refund share
/// the request id).
fn row_id(r: &ExportRow) -> String {
    format!("{}:{}", r.key.kind.as_str(), r.key.id)
}

fn json_line(r: &ExportRow) -> Value {
    json!({
        "id": row_id(r),
        "type": r.key.kind.as_str(),
        "account_id": r.account_id,
        "request_id": r.request_id,
        "lease_id": r.lease_id,
        "route": r.route,
        "method": r.method,
        "path": r.path,
        "units": r.units,
        "upstream_status": r.upstream_status,
        "at": rfc3339(r.key.at),
        "at_ms": r.key.at,
    })
}

fn cloud_event(r: &ExportRow) -> Value {
    json!({
        "specversion": "1.0",
        "id": row_id(r),
        "source": SOURCE,
        "type": format!("dev.farebox.{}", r.key.kind.as_str()),
        "time": rfc3339(r.key.at),
        "subject": r.account_id,
        "datacontenttype": "application/json",
        "data": {
            "units": r.units,
            "request_id": r.request_id,
            "lease_id": r.lease_id,
            "route": r.route,
            "method": r.method,
            "path": r.path,
            "upstream_status": r.upstream_status,
        },
    })
}

fn csv_body(rows: &[ExportRow]) -> Result<Vec<u8>, String> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(CSV_COLUMNS).map_err(|e| e.to_string())?;
    for r in rows {
        let opt = |v: Option<i64>| v.map(|n| n.to_string()).unwrap_or_default();
        w.write_record([
            row_id(r),
            r.key.kind.as_str().to_owned(),
            r.account_id.clone(),
            r.request_id.clone(),
            r.lease_id.clone().unwrap_or_default(),
            r.route.clone(),
            r.method.clone(),
            r.path.clone(),
            r.units.to_string(),
            opt(r.upstream_status),
            rfc3339(r.key.at),
            r.key.at.to_string(),
        ])
        .map_err(|e| e.to_string())?;
    }
    w.into_inner().map_err(|e| e.to_string())
}

pub(super) async fn charges(
    State(st): State<Shared>,
    params: Result<Query<ExportParams>, QueryRejection>,
) -> Response {
    let bad = |msg: String| error(StatusCode::BAD_REQUEST, msg);
    let Query(p) = match params {
        Ok(p) => p,
        Err(e) => return bad(format!("invalid query: {}", e.body_text())),
    };
    let format = match p.format.as_deref() {
        None | Some("") | Some("jsonl") => Format::JsonLines,
        Some("csv") => Format::Csv,
        Some("cloudevents") => Format::CloudEvents,
        Some(other) => {
            return bad(format!(
                "format must be jsonl, csv or cloudevents, got {other:?}"
            ))
        }
    };
    let now = crate::util::now_ms();
    let (from, to) = match (
        time_param("from", p.from.as_deref(), i64::MIN),
        time_param("to", p.to.as_deref(), i64::MAX),
    ) {
        (Ok(f), Ok(t)) => (f, t),
        (Err(e), _) | (_, Err(e)) => return bad(e),
    };
    if let Some(a) = p.account.as_deref().filter(|a| !valid_account_id(a)) {
        return bad(format!("account {a:?} is not a valid account id"));
    }
    let limit = match p.limit.unwrap_or(DEFAULT_LIMIT) {
        n @ 1..=MAX_LIMIT => n,
        n => return bad(format!("limit must be between 1 and {MAX_LIMIT}, got {n}")),
    };
    let after = match p.cursor.as_deref() {
        None | Some("") => None,
        Some(c) => match decode_cursor(c) {
            Some(k) => Some(k),
            None => return bad("cursor is not one this service gave out".to_owned()),
        },
    };
    // Rows younger than the settle window are left for a later page: a
    // transaction that committed after this read could sort before them.
    let settle = i64::try_from(st.cfg.export_settle_ms).unwrap_or(i64::MAX);
    let horizon = now.saturating_sub(settle).saturating_add(1);
    let capped = to > horizon;
    let query = ExportQuery {
        from,
        to: to.min(horizon),
        account: p.account.filter(|a| !a.is_empty()),
        after,
        limit: i64::try_from(limit + 1).unwrap_or(i64::MAX),
    };
    let mut rows = match stored(st.store.export(query)).await {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let full = rows.len() > usize::try_from(limit).unwrap_or(usize::MAX);
    rows.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    let next = rows
        .last()
        .filter(|_| full || capped)
        .map(|r| encode_cursor(&r.key));
    let (content_type, body) = match format {
        Format::Csv => match csv_body(&rows) {
            Ok(b) => ("text/csv; charset=utf-8", b),
            Err(e) => {
                tracing::error!(cause = %e, "csv export failed");
                return error(StatusCode::INTERNAL_SERVER_ERROR, "internal");
            }
        },
        Format::JsonLines | Format::CloudEvents => {
            let mut out = Vec::new();
            for r in &rows {
                let v = match format {
                    Format::CloudEvents => cloud_event(r),
                    _ => json_line(r),
                };
                out.extend_from_slice(v.to_string().as_bytes());
                out.push(b'\n');
            }
            ("application/x-ndjson", out)
        }
    };
    let mut resp = (StatusCode::OK, body).into_response();
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(c) = next.and_then(|c| HeaderValue::try_from(c).ok()) {
        h.insert(NEXT_CURSOR, c);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_refuse_garbage() {
        let k = ExportKey {
            at: 1_764_590_400_000,
            kind: ExportKind::LeaseRefund,
            id: "rid:with:colons".to_owned(),
        };
        assert_eq!(decode_cursor(&encode_cursor(&k)), Some(k));
        for bad in ["", "c1", "c1zz", "c1313", "x1ab", "c13a3a"] {
            assert_eq!(decode_cursor(bad), None, "{bad}");
        }
    }
}
