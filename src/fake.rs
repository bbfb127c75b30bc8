//! An in-memory host for native tests: records what the filter asked of it.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use crate::host::{Host, HttpHost};
use crate::metrics::Metric;
use crate::response::Reply;

#[derive(Debug, Clone)]
pub struct Call {
    pub token: u32,
    pub cluster: String,
    pub headers: Vec<(String, String)>,
    pub body: serde_json::Value,
    pub timeout: Duration,
}

impl Call {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Shared data as Envoy keeps it: one map per process, with CAS tokens.
pub type SharedData = Rc<RefCell<HashMap<String, (Vec<u8>, u32)>>>;

/// The kinds of host call the filter makes (each one a crossing into Envoy).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HostCall {
    SharedGet,
    SharedSet,
    Dispatch,
    Clock,
    RequestHeader,
    RequestHeaders,
    SetRequestHeader,
    ResponseHeader,
    SetResponseHeader,
    RequestBody,
    SetRequestBody,
    ResponseBody,
    SendReply,
    Resume,
    SetProperty,
}

#[derive(Default)]
pub struct FakeHost {
    pub request_headers: RefCell<Vec<(String, Vec<u8>)>>,
    pub response_headers: RefCell<Vec<(String, Vec<u8>)>>,
    pub shared: SharedData,
    pub calls: RefCell<Vec<Call>>,
    pub replies: RefCell<Vec<Reply>>,
    pub resumed: Cell<u32>,
    pub now: Cell<u64>,
    pub metrics: RefCell<HashMap<Metric, u64>>,
    pub refuse_dispatch: Cell<bool>,
    pub request_body: RefCell<Vec<u8>>,
    /// Like Envoy after the headers went on: reading or writing them is an error
    /// (which the SDK turns into a panic), counted here.
    pub headers_locked: Cell<bool>,
    pub late_header_access: Cell<u32>,
    pub response_chunk: RefCell<Vec<u8>>,
    /// Host calls made, by kind (metrics are not host calls: the glue batches them).
    pub host_calls: RefCell<HashMap<HostCall, u32>>,
    /// Properties set (the access-log fields), last value wins.
    pub properties: RefCell<HashMap<String, String>>,
    next_token: Cell<u32>,
}

impl FakeHost {
    pub fn request(method: &str, path: &str, headers: &[(&str, &str)]) -> FakeHost {
        let host = FakeHost {
            now: Cell::new(1_700_000_000_000),
            ..Default::default()
        };
        host.add_request_header(":method", method.as_bytes());
        host.add_request_header(":path", path.as_bytes());
        for (k, v) in headers {
            host.add_request_header(k, v.as_bytes());
        }
        host
    }

    /// Another worker of the same process: shares the shared data, nothing else.
    pub fn sibling(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> FakeHost {
        let host = FakeHost::request(method, path, headers);
        FakeHost {
            shared: self.shared.clone(),
            now: Cell::new(self.now.get()),
            ..host
        }
    }

    pub fn add_request_header(&self, name: &str, value: &[u8]) {
        self.request_headers
            .borrow_mut()
            .push((name.to_string(), value.to_vec()));
    }

    pub fn set_status(&self, status: u16) {
        self.response_headers
            .borrow_mut()
            .push((":status".into(), status.to_string().into_bytes()));
    }

    pub fn count_of(&self, m: Metric) -> u64 {
        self.metrics.borrow().get(&m).copied().unwrap_or(0)
    }

    pub fn last_call(&self) -> Call {
        // A missing call shows up as token 0 and a null body, which every test checks.
        self.calls.borrow().last().cloned().unwrap_or(Call {
            token: 0,
            cluster: String::new(),
            headers: Vec::new(),
            body: serde_json::Value::Null,
            timeout: Duration::ZERO,
        })
    }

    pub fn reply(&self) -> Option<Reply> {
        self.replies.borrow().last().cloned()
    }

    pub fn upstream_header(&self, name: &str) -> Option<String> {
        header(&self.request_headers.borrow(), name)
    }

    pub fn client_header(&self, name: &str) -> Option<String> {
        header(&self.response_headers.borrow(), name)
    }

    fn called(&self, kind: HostCall) {
        *self.host_calls.borrow_mut().entry(kind).or_default() += 1;
    }

    /// The host calls made so far, by kind, in a stable order (for budget tests).
    pub fn host_call_counts(&self) -> Vec<(HostCall, u32)> {
        let mut counts: Vec<_> = self
            .host_calls
            .borrow()
            .iter()
            .map(|(k, n)| (*k, *n))
            .collect();
        counts.sort();
        counts
    }

    pub fn advance(&self, ms: u64) {
        self.now.set(self.now.get() + ms);
    }
}

fn header(list: &[(String, Vec<u8>)], name: &str) -> Option<String> {
    list.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
}

impl Host for FakeHost {
    fn shared_get(&self, key: &str) -> Option<(Vec<u8>, Option<u32>)> {
        self.called(HostCall::SharedGet);
        self.shared
            .borrow()
            .get(key)
            .map(|(v, cas)| (v.clone(), Some(*cas)))
    }

    fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> bool {
        self.called(HostCall::SharedSet);
        let mut map = self.shared.borrow_mut();
        if let (Some(cas), Some((_, current))) = (cas, map.get(key)) {
            if cas != *current {
                return false;
            }
        }
        // Like Envoy: every write gives the key a new CAS token.
        let next = map.get(key).map_or(1, |(_, c)| c + 1);
        map.insert(key.to_string(), (value.to_vec(), next));
        true
    }

    fn dispatch(
        &self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        timeout: Duration,
    ) -> Result<u32, String> {
        self.called(HostCall::Dispatch);
        if self.refuse_dispatch.get() {
            return Err("BadArgument".into());
        }
        let token = self.next_token.get() + 1;
        self.next_token.set(token);
        self.calls.borrow_mut().push(Call {
            token,
            cluster: cluster.into(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: serde_json::from_slice(body).unwrap_or(serde_json::Value::Null),
            timeout,
        });
        Ok(token)
    }

    fn now_ms(&self) -> u64 {
        self.called(HostCall::Clock);
        self.now.get()
    }

    fn add(&self, metric: Metric, n: u64) {
        *self.metrics.borrow_mut().entry(metric).or_default() += n;
    }
}

impl HttpHost for FakeHost {
    fn request_header(&self, name: &str) -> Option<Vec<u8>> {
        self.called(HostCall::RequestHeader);
        if self.headers_locked.get() {
            self.late_header_access
                .set(self.late_header_access.get() + 1);
            return None;
        }
        self.request_headers
            .borrow()
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    }

    fn request_headers(&self) -> Option<Vec<u8>> {
        self.called(HostCall::RequestHeaders);
        if self.headers_locked.get() {
            self.late_header_access
                .set(self.late_header_access.get() + 1);
            return None;
        }
        let headers = self.request_headers.borrow();
        Some(crate::header_snapshot::HeaderMap::serialize(
            headers.iter().map(|(k, v)| (k.as_str(), v.as_slice())),
        ))
    }

    fn set_request_header(&self, name: &str, value: Option<&str>) {
        self.called(HostCall::SetRequestHeader);
        if self.headers_locked.get() {
            self.late_header_access
                .set(self.late_header_access.get() + 1);
            return;
        }
        let mut headers = self.request_headers.borrow_mut();
        headers.retain(|(k, _)| k != name);
        if let Some(v) = value {
            headers.push((name.to_string(), v.as_bytes().to_vec()));
        }
    }

    fn response_header(&self, name: &str) -> Option<Vec<u8>> {
        self.called(HostCall::ResponseHeader);
        self.response_headers
            .borrow()
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    }

    fn set_response_header(&self, name: &str, value: &str) {
        self.called(HostCall::SetResponseHeader);
        let mut headers = self.response_headers.borrow_mut();
        headers.retain(|(k, _)| k != name);
        headers.push((name.to_string(), value.as_bytes().to_vec()));
    }

    fn request_body(&self, size: usize) -> Option<Vec<u8>> {
        self.called(HostCall::RequestBody);
        let body = self.request_body.borrow();
        Some(body.get(..size.min(body.len()))?.to_vec())
    }

    fn set_request_body(&self, size: usize, body: &[u8]) -> bool {
        self.called(HostCall::SetRequestBody);
        let mut current = self.request_body.borrow_mut();
        if size < current.len() {
            return false; // like Envoy: only the whole buffered body is replaced
        }
        *current = body.to_vec();
        true
    }

    fn response_body(&self, size: usize) -> Option<Vec<u8>> {
        self.called(HostCall::ResponseBody);
        let chunk = self.response_chunk.borrow();
        Some(chunk.get(..size.min(chunk.len()))?.to_vec())
    }

    fn send_reply(&self, reply: &Reply) {
        self.called(HostCall::SendReply);
        self.replies.borrow_mut().push(reply.clone());
    }

    fn resume_request(&self) {
        self.called(HostCall::Resume);
        self.resumed.set(self.resumed.get() + 1);
    }

    fn set_property(&self, name: &str, value: &[u8]) {
        self.called(HostCall::SetProperty);
        let mut properties = self.properties.borrow_mut();
        if name == crate::access_log::RECORD {
            // The record's fields, as `farebox.<key>` like Envoy's formatter prints them
            // one by one; a value that does not decode leaves them absent, failing the test
            // that reads one.
            for key in crate::access_log::KEYS {
                properties.remove(&format!("farebox.{key}"));
            }
            let fields = crate::access_log::decode_record(value).unwrap_or_default();
            for (key, v) in fields {
                properties.insert(format!("farebox.{key}"), v);
            }
        } else {
            let value = String::from_utf8_lossy(value).into_owned();
            properties.insert(name.to_string(), value);
        }
    }
}
