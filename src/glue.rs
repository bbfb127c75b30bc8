//! The proxy-wasm layer: contexts that hand every callback to the gate, and
//! the host trait over Envoy's hostcalls. Hostcalls are used directly (not the
//! SDK's trait defaults, which unwrap) so every host error is handled here.

use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType};

use crate::balance_api::{CalloutResponse, MAX_ANSWER_BYTES};
use crate::config::Config;
use crate::gate::{Flow, Gate, Worker};
use crate::host::{Host, HttpHost};
use crate::metrics::Metric;
use crate::response::Reply;

/// How often the root context sends due refunds.
const TICK: Duration = Duration::from_millis(100);

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(Root { cfg: None, worker: Rc::new(Worker::default()), host: WasmHost::default() })
    });
}}

/// Host metric ids, by [`Metric::index`]; `None` where the host refused to define one.
type MetricIds = Rc<[Option<u32>; Metric::ALL.len()]>;

#[derive(Clone, Default)]
struct WasmHost {
    metrics: MetricIds,
}

impl Host for WasmHost {
    fn shared_get(&self, key: &str) -> Option<(Vec<u8>, Option<u32>)> {
        match hostcalls::get_shared_data(key) {
            Ok((Some(v), cas)) => Some((v, cas)),
            Ok((None, _)) => None,
            Err(e) => {
                log::warn!("shared data read failed: {e:?}");
                None
            }
        }
    }

    fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> bool {
        hostcalls::set_shared_data(key, Some(value), cas).is_ok()
    }

    fn dispatch(
        &self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        timeout: Duration,
    ) -> Result<u32, String> {
        hostcalls::dispatch_http_call(cluster, headers.to_vec(), Some(body), vec![], timeout)
            .map_err(|status| {
                format!("host refused the call ({status:?}); is the cluster defined?")
            })
    }

    fn now_ms(&self) -> u64 {
        hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    fn count(&self, metric: Metric) {
        if let Some(Some(id)) = self.metrics.get(metric.index()) {
            let _ = hostcalls::increment_metric(*id, 1);
        }
    }
}

impl HttpHost for WasmHost {
    fn request_header(&self, name: &str) -> Option<Vec<u8>> {
        hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, name)
            .ok()
            .flatten()
    }

    fn set_request_header(&self, name: &str, value: Option<&str>) {
        if let Err(e) = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, value) {
            log::warn!("could not set request header {name}: {e:?}");
        }
    }

    fn response_header(&self, name: &str) -> Option<Vec<u8>> {
        hostcalls::get_map_value_bytes(MapType::HttpResponseHeaders, name)
            .ok()
            .flatten()
    }

    fn set_response_header(&self, name: &str, value: &str) {
        if let Err(e) = hostcalls::set_map_value(MapType::HttpResponseHeaders, name, Some(value)) {
            log::warn!("could not set response header {name}: {e:?}");
        }
    }

    fn send_reply(&self, reply: &Reply) {
        let headers: Vec<(&str, &str)> = reply
            .headers
            .iter()
            .map(|(k, v)| (*k, v.as_str()))
            .collect();
        if let Err(e) = hostcalls::send_http_response(reply.status, headers, Some(&reply.body)) {
            log::error!("could not send the {} reply: {e:?}", reply.status);
        }
    }

    fn resume_request(&self) {
        if let Err(e) = hostcalls::resume_http_request() {
            log::warn!("could not resume the request: {e:?}");
        }
    }
}

fn callout_response(body_size: usize) -> CalloutResponse {
    let headers = hostcalls::get_map_bytes(MapType::HttpCallResponseHeaders).unwrap_or_default();
    let status = headers
        .iter()
        .find(|(k, _)| k == ":status")
        .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse().ok());
    let body_too_large = body_size > MAX_ANSWER_BYTES;
    let body = if body_too_large || body_size == 0 {
        Vec::new()
    } else {
        hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
            .ok()
            .flatten()
            .unwrap_or_default()
    };
    CalloutResponse {
        status,
        headers,
        body,
        body_too_large,
    }
}

struct Root {
    cfg: Option<Rc<Config>>,
    worker: Rc<Worker>,
    host: WasmHost,
}

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        token: u32,
        _headers: usize,
        _body_size: usize,
        _trailers: usize,
    ) {
        let status = callout_response(0).status;
        self.worker
            .refunds
            .borrow_mut()
            .on_response(&self.host, token, status);
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, size: usize) -> bool {
        // Follow Envoy's log level, so filtered-out lines cost nothing to format.
        if let Ok(level) = hostcalls::get_log_level() {
            proxy_wasm::set_log_level(level);
        }
        let raw = match hostcalls::get_buffer(BufferType::PluginConfiguration, 0, size) {
            Ok(Some(raw)) => raw,
            _ => Vec::new(),
        };
        let cfg = match Config::parse(&raw) {
            Ok(cfg) => cfg,
            Err(e) => {
                log::error!("{e}");
                return false;
            }
        };
        if self.host.metrics.iter().all(Option::is_none) {
            let mut ids = [None; Metric::ALL.len()];
            for (slot, metric) in ids.iter_mut().zip(Metric::ALL) {
                *slot = hostcalls::define_metric(MetricType::Counter, metric.name()).ok();
            }
            self.host.metrics = Rc::new(ids);
        }
        if let Err(e) = hostcalls::set_tick_period(TICK) {
            log::warn!("no timer ({e:?}): refunds will not be sent");
        }
        log::info!(
            "farebox configured: cluster {:?}, {} route rules, failure_mode {:?}, cache {} entries",
            cfg.cluster,
            cfg.pricing.routes.len(),
            cfg.failure_mode,
            cfg.cache_max_entries
        );
        self.cfg = Some(Rc::new(cfg));
        true
    }

    fn on_tick(&mut self) {
        if let Some(cfg) = &self.cfg {
            let mut refunds = self.worker.refunds.borrow_mut();
            if !refunds.is_empty() {
                refunds.flush(&self.host, cfg);
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream {
            gate: Gate::new(self.cfg.clone(), self.worker.clone()),
            host: self.host.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Stream {
    gate: Gate,
    host: WasmHost,
}

fn action(flow: Flow) -> Action {
    match flow {
        Flow::Continue => Action::Continue,
        Flow::Pause => Action::Pause,
    }
}

impl Context for Stream {
    fn on_http_call_response(
        &mut self,
        token: u32,
        _headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        self.gate
            .on_callout_response(&self.host, token, &callout_response(body_size));
    }
}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        action(self.gate.on_request_headers(&self.host))
    }

    fn on_http_request_body(&mut self, _body_size: usize, _end_of_stream: bool) -> Action {
        action(self.gate.on_request_body())
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        action(self.gate.on_request_body())
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        self.gate.on_response_headers(&self.host);
        Action::Continue
    }

    fn on_log(&mut self) {
        self.gate.on_log(&self.host);
    }
}
