//! Shared start-up of the mock upstreams (`farebox-echo`, `farebox-llm`,
//! `farebox-mcp`):
//! `--listen ADDR` (or the environment fallback), the one
//! `<name> listening on ADDR` stdout line, keep-alive HTTP/1.1 until SIGINT or
//! SIGTERM. Included by each binary with `mod mock_support;`.

use axum::handler::Handler;
use axum::routing::{get, post};
use axum::Router;
use std::io::Write;
use std::process::ExitCode;

/// What a mock binary is called and how it starts.
pub struct Mock {
    /// Program name, also the prefix of the listening line.
    pub name: &'static str,
    /// Listen address when neither `--listen` nor the environment sets one.
    pub default_listen: &'static str,
    /// Environment variable read when `--listen` is absent (empty = unset).
    pub env_listen: &'static str,
    /// `--help` text.
    pub usage: &'static str,
}

impl Mock {
    /// Parses the arguments, binds, prints the listening line and serves
    /// `app` until SIGINT/SIGTERM. Exit status 2 on a bad argument.
    pub fn main(&self, app: impl FnOnce() -> Router) -> ExitCode {
        let name = self.name;
        let mut listen: Option<String> = None;
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--help" | "-h" => {
                    print!("{}", self.usage);
                    return ExitCode::SUCCESS;
                }
                "--listen" => match args.next() {
                    Some(v) => listen = Some(v),
                    None => {
                        eprintln!("{name}: --listen needs a value\n\n{}", self.usage);
                        return ExitCode::from(2);
                    }
                },
                other => {
                    if let Some(v) = other.strip_prefix("--listen=") {
                        listen = Some(v.to_owned());
                    } else {
                        eprintln!("{name}: unknown argument {other:?}\n\n{}", self.usage);
                        return ExitCode::from(2);
                    }
                }
            }
        }
        let listen = listen
            .or_else(|| {
                std::env::var(self.env_listen)
                    .ok()
                    .filter(|v| !v.is_empty())
            })
            .unwrap_or_else(|| self.default_listen.to_owned());
        let rt = match tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("{name}: cannot start the runtime: {e}");
                return ExitCode::FAILURE;
            }
        };
        match rt.block_on(serve(name, listen, app)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{name}: {e}");
                ExitCode::FAILURE
            }
        }
    }
}

async fn serve(name: &str, listen: String, app: impl FnOnce() -> Router) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("cannot read the bound address: {e}"))?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{name} listening on {addr}")
            .and_then(|()| out.flush())
            .map_err(|e| format!("cannot write to stdout: {e}"))?;
    }
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app())
        .with_graceful_shutdown(farebox_balance::util::shutdown_signal())
        .await
        .map_err(|e| format!("server error: {e}"))
}

async fn healthz() -> &'static str {
    "ok"
}

/// Adds what every mock API shares to `api`: `GET /stats`,
/// `POST /stats/reset`, `GET /healthz`, the `not_found` fallback, and a
/// fresh default state.
pub fn with_admin_routes<S, H1, T1, H2, T2, H3, T3>(
    api: Router<S>,
    stats: H1,
    stats_reset: H2,
    not_found: H3,
) -> Router
where
    S: Clone + Default + Send + Sync + 'static,
    H1: Handler<T1, S>,
    H2: Handler<T2, S>,
    H3: Handler<T3, S>,
    T1: 'static,
    T2: 'static,
    T3: 'static,
{
    api.route("/stats", get(stats))
        .route("/stats/reset", post(stats_reset))
        .route("/healthz", get(healthz))
        .fallback(not_found)
        .with_state(S::default())
}

/// The status asked for by an `x-mock-status` header (200-599), if any.
pub fn mock_status(headers: &axum::http::HeaderMap) -> Option<axum::http::StatusCode> {
    let v = headers.get("x-mock-status")?.to_str().ok()?.trim();
    let n: u16 = v.parse().ok()?;
    if !(200..=599).contains(&n) {
        return None;
    }
    axum::http::StatusCode::from_u16(n).ok()
}
