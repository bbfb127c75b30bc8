//! The proxy-wasm layer: contexts that hand every callback to the gate, and
//! the host trait over Envoy's hostcalls. Hostcalls are used directly (not the
//! SDK's trait defaults, which unwrap) so every host error is handled here.
//!
//! The only crate that depends on proxy-wasm: the logic is the `farebox` crate
//! (the repository root), which cannot reach the SDK. Compiled for wasm32 only (on
//! the host this crate is empty): native tests drive the logic through `farebox::fake`.
#![cfg(target_arch = "wasm32")]

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::{Rc, Weak};
use std::time::{Duration, UNIX_EPOCH};

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType};

use farebox::balance_api::{CalloutResponse, MAX_ANSWER_BYTES};
use farebox::config::{Config, Mode};
use farebox::gate::{Flow, Gate, Worker};
use farebox::header_snapshot::Snapshot;
use farebox::host::{Host, HttpHost};
use farebox::metrics::Metric;
use farebox::response::Reply;

/// How often the root context sends due refunds.
const TICK: Duration = Duration::from_millis(100);
/// In lease mode the timer also wakes requests waiting for a lease, so it runs often.
const LEASE_TICK: Duration = Duration::from_millis(10);
/// Counts go to the host every this many ticks in lease mode (every 100 ms, as in
/// authorize mode): each is one hostcall per metric that moved.
const LEASE_TICKS_PER_FLUSH: u32 = 10;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|context_id| -> Box<dyn RootContext> {
        Box::new(Root {
            id: context_id,
            cfg: None,
            worker: Rc::new(Worker::default()),
            host: WasmHost::default(),
            waiting: Rc::default(),
            ticks: 0,
        })
    });
}}

/// Host metric ids, by [`Metric::index`]; `None` where the host refused to define one.
type MetricIds = Rc<[Option<u32>; Metric::ALL.len()]>;

#[derive(Clone, Default)]
struct WasmHost {
    metrics: MetricIds,
    /// Counts not yet handed to the host: added up here and flushed by the timer,
    /// so a request costs no metric hostcall at all.
    pending: Rc<[Cell<u64>; Metric::ALL.len()]>,
}

impl WasmHost {
    fn flush_metrics(&self) {
        for (pending, id) in self.pending.iter().zip(self.metrics.iter()) {
            let n = pending.take();
            if let (true, Some(id)) = (n > 0, id) {
                let _ = hostcalls::increment_metric(*id, i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
    }
}

impl WasmHost {
    /// The host as the gate and the worker see it outside the request-headers callback
    /// (one host type for all of them: their generic code is compiled once).
    fn stream(&self) -> Snapshot<'_, WasmHost> {
        Snapshot::passthrough(self)
    }
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

    fn add(&self, metric: Metric, n: u64) {
        if let Some(cell) = self.pending.get(metric.index()) {
            cell.set(cell.get().saturating_add(n));
        }
    }
}

impl HttpHost for WasmHost {
    fn request_header(&self, name: &str) -> Option<Vec<u8>> {
        hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, name)
            .ok()
            .flatten()
    }

    fn request_headers(&self) -> Option<Vec<u8>> {
        let mut data: *mut u8 = std::ptr::null_mut();
        let mut size: usize = 0;
        // SAFETY: the host writes a buffer it allocated through the module's
        // `proxy_on_memory_allocate` (a `Vec<u8>` of `size` capacity, as the SDK
        // allocates it), which is ours to free; on any status but Ok nothing is written.
        unsafe {
            if proxy_get_header_map_pairs(MapType::HttpRequestHeaders as u32, &mut data, &mut size)
                != 0
            {
                return None;
            }
            if data.is_null() {
                return Some(Vec::new());
            }
            Some(Vec::from_raw_parts(data, size, size))
        }
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

    fn request_body(&self, size: usize) -> Option<Vec<u8>> {
        hostcalls::get_buffer(BufferType::HttpRequestBody, 0, size)
            .ok()
            .flatten()
    }

    fn set_request_body(&self, size: usize, body: &[u8]) -> bool {
        match hostcalls::set_buffer(BufferType::HttpRequestBody, 0, size, body) {
            Ok(()) => true,
            Err(e) => {
                log::warn!("could not rewrite the request body: {e:?}");
                false
            }
        }
    }

    fn response_body(&self, size: usize) -> Option<Vec<u8>> {
        hostcalls::get_buffer(BufferType::HttpResponseBody, 0, size)
            .ok()
            .flatten()
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

    fn set_property(&self, name: &str, value: &[u8]) {
        // SAFETY: both buffers outlive the call, which only reads them.
        let status =
            unsafe { proxy_set_property(name.as_ptr(), name.len(), value.as_ptr(), value.len()) };
        if status != 0 {
            log::debug!("access-log field {name} not set (status {status})");
        }
    }
}

// The SDK's `get_map_bytes` panics on a status but Ok and on a non-UTF-8 name, and
// `set_property` on any status but Ok (Envoy answers NotFound when the
// stream is gone, BadArgument for a value it will not take), so the hostcall is made
// here and its status handled.
#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_header_map_pairs(
        map_type: u32,
        return_map_data: *mut *mut u8,
        return_map_size: *mut usize,
    ) -> u32;
    fn proxy_set_property(
        path_data: *const u8,
        path_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_call_foreign_function(
        function_name_data: *const u8,
        function_name_size: usize,
        arguments_data: *const u8,
        arguments_size: usize,
        results_data: *mut *mut u8,
        results_size: *mut usize,
    ) -> u32;
}

/// Declares the access-log record's property as a `google.protobuf.Struct`
/// (src/access_log.rs), so Envoy's CEL formatter reads its fields and `TYPED` prints it
/// as an object. Envoy keeps the first declaration of a name (BadArgument on a reconfigure
/// is that); a host without the foreign function still gets the value, as bytes. Raw, as
/// the SDK's `call_foreign_function` panics on statuses it does not expect.
fn declare_access_log_record() {
    const NAME: &str = "declare_property";
    let args = farebox::access_log::declare_record_args();
    let mut result: *mut u8 = std::ptr::null_mut();
    let mut result_size: usize = 0;
    // SAFETY: the name and arguments outlive the call, which only reads them; the two
    // out-pointers point at live locals. declare_property returns no data, so nothing is
    // allocated for `result`.
    let status = unsafe {
        proxy_call_foreign_function(
            NAME.as_ptr(),
            NAME.len(),
            args.as_ptr(),
            args.len(),
            &mut result,
            &mut result_size,
        )
    };
    if status != 0 {
        log::debug!("access-log record not declared (status {status}): kept as bytes");
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

/// Streams parked until another request's lease call is over, and calls
/// made for them from the root context (whose answers the root receives).
#[derive(Default)]
struct Waiting {
    parked: Vec<(u32, Weak<RefCell<Gate>>)>,
    calls: HashMap<u32, (u32, Weak<RefCell<Gate>>)>,
}

struct Root {
    id: u32,
    cfg: Option<Rc<Config>>,
    worker: Rc<Worker>,
    host: WasmHost,
    waiting: Rc<RefCell<Waiting>>,
    /// Timer ticks so far (metrics are flushed on some of them).
    ticks: u32,
}

impl Root {
    /// Runs `f` on a stream's gate with that stream as the effective context,
    /// so what the gate asks of the host (headers, replies, resume) lands on it.
    fn on_stream(
        &self,
        context_id: u32,
        gate: &Weak<RefCell<Gate>>,
        f: impl FnOnce(&mut Gate) -> Flow,
    ) -> Option<Flow> {
        let gate = gate.upgrade()?;
        hostcalls::set_effective_context(context_id).ok()?;
        let mut gate = gate.try_borrow_mut().ok()?;
        let flow = f(&mut gate);
        gate.publish_access_log(&self.host.stream());
        if flow == Flow::Continue {
            self.host.resume_request();
        }
        Some(flow)
    }

    fn wake_parked(&self) {
        let parked = std::mem::take(&mut self.waiting.borrow_mut().parked);
        for (id, gate) in parked {
            match self.on_stream(id, &gate, |g| g.on_wake(&self.host.stream())) {
                Some(Flow::Park) => self.waiting.borrow_mut().parked.push((id, gate)),
                // A call made while the root is the active context answers to the root.
                Some(Flow::Pause(Some(token))) => {
                    log::debug!(
                        "woken stream {id} made call {token}; its answer comes to the root"
                    );
                    self.waiting.borrow_mut().calls.insert(token, (id, gate));
                }
                _ => {}
            }
        }
        // Back to the root, so that calls made next (settlements) belong to it and
        // are not cancelled with some stream.
        if let Err(e) = hostcalls::set_effective_context(self.id) {
            log::warn!("could not return to the root context: {e:?}");
        }
    }
}

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        token: u32,
        _headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        let routed = self.waiting.borrow_mut().calls.remove(&token);
        log::debug!(
            "root got the answer to call {token} (routed to a stream: {})",
            routed.is_some()
        );
        match routed {
            Some((id, gate)) => {
                // The answer belongs to the stream that made the call: read it as that stream.
                let flow = self.on_stream(id, &gate, |g| {
                    g.on_callout_response(&self.host.stream(), token, &callout_response(body_size))
                });
                // Parked again (waiting for recalled credit): the timer wakes it.
                if flow == Some(Flow::Park) {
                    self.waiting.borrow_mut().parked.push((id, gate));
                }
                if let Err(e) = hostcalls::set_effective_context(self.id) {
                    log::warn!("could not return to the root context: {e:?}");
                }
            }
            None => {
                if let Some(cfg) = &self.cfg {
                    let resp = callout_response(body_size);
                    self.worker
                        .on_outbox_response(&self.host.stream(), cfg, token, &resp);
                }
            }
        }
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
        let tick = match cfg.mode {
            Mode::Authorize => TICK,
            Mode::Lease => LEASE_TICK,
        };
        if let Err(e) = hostcalls::set_tick_period(tick) {
            log::warn!("no timer ({e:?}): refunds and settlements will not be sent");
        }
        *self.worker.holder.borrow_mut() = holder_id(&self.host);
        if cfg.access_log {
            declare_access_log_record();
        }
        log::info!(
            "farebox configured: {:?} mode, cluster {:?}, {} route rules, failure_mode {:?}, cache {} entries",
            cfg.mode,
            cfg.cluster,
            cfg.pricing.routes.len(),
            cfg.failure_mode,
            cfg.cache_max_entries
        );
        self.cfg = Some(Rc::new(cfg));
        true
    }

    fn on_tick(&mut self) {
        let flush_every = match self.cfg.as_deref().map(|c| c.mode) {
            Some(Mode::Lease) => LEASE_TICKS_PER_FLUSH,
            _ => 1,
        };
        self.ticks = self.ticks.wrapping_add(1);
        if self.ticks.is_multiple_of(flush_every) {
            self.host.flush_metrics();
        }
        if !self.waiting.borrow().parked.is_empty() {
            self.wake_parked();
        }
        if let Some(cfg) = &self.cfg {
            self.worker.tick(&self.host.stream(), cfg);
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream {
            id: context_id,
            gate: Rc::new(RefCell::new(Gate::new(
                self.cfg.clone(),
                self.worker.clone(),
            ))),
            host: self.host.clone(),
            waiting: self.waiting.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// One id per Envoy process (all workers share it through shared data), so the
/// balance service can tell which process holds a lease. The first VM to
/// configure (Envoy's main thread) makes it up.
fn holder_id(host: &WasmHost) -> String {
    const KEY: &str = "farebox:holder";
    if let Some((id, _)) = host.shared_get(KEY) {
        if let Ok(id) = String::from_utf8(id) {
            if !id.is_empty() {
                return id;
            }
        }
    }
    let node = hostcalls::get_property(vec!["node", "id"])
        .ok()
        .flatten()
        .unwrap_or_default();
    let node = String::from_utf8_lossy(&node).into_owned();
    let nanos = hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let id = format!(
        "{}envoy-{nanos:x}",
        if node.is_empty() {
            String::new()
        } else {
            format!("{node}/")
        }
    );
    host.shared_set(KEY, id.as_bytes(), None);
    id
}

struct Stream {
    id: u32,
    gate: Rc<RefCell<Gate>>,
    host: WasmHost,
    waiting: Rc<RefCell<Waiting>>,
}

impl Stream {
    fn run(&self, f: impl FnOnce(&mut Gate) -> Flow) -> Action {
        let Ok(mut gate) = self.gate.try_borrow_mut() else {
            return Action::Pause;
        };
        let flow = f(&mut gate);
        gate.publish_access_log(&self.host.stream());
        match flow {
            Flow::Continue => Action::Continue,
            Flow::Pause(_) => Action::Pause,
            Flow::Park => {
                self.waiting
                    .borrow_mut()
                    .parked
                    .push((self.id, Rc::downgrade(&self.gate)));
                Action::Pause
            }
        }
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
        let resp = callout_response(body_size);
        if self.run(|g| g.on_callout_response(&self.host.stream(), token, &resp))
            == Action::Continue
        {
            self.host.resume_request();
        }
    }
}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        // The headers are read in one call, for this callback only.
        let host = Snapshot::new(&self.host);
        self.run(|g| g.on_request_headers_eos(&host, end_of_stream))
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.run(|g| g.on_request_body(&self.host.stream(), body_size, end_of_stream))
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        self.run(|g| g.on_request_trailers(&self.host.stream()))
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if let Ok(mut gate) = self.gate.try_borrow_mut() {
            gate.on_response_body(&self.host.stream(), body_size, end_of_stream);
            if end_of_stream {
                gate.publish_access_log(&self.host.stream());
            }
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if let Ok(mut gate) = self.gate.try_borrow_mut() {
            gate.on_response_headers(&self.host.stream());
            gate.publish_access_log(&self.host.stream());
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        if let Ok(mut gate) = self.gate.try_borrow_mut() {
            gate.on_log(&self.host.stream());
            gate.publish_access_log(&self.host.stream());
        }
    }
}
