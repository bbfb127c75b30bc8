//! The few things the filter asks of its host. The proxy-wasm glue (the farebox-filter
//! crate, filter/) implements these over Envoy; native tests implement them in memory.

use std::time::Duration;

use crate::metrics::Metric;
use crate::response::Reply;

/// What every context can do (the root context too).
pub trait Host {
    /// A shared-data value and its CAS token.
    fn shared_get(&self, key: &str) -> Option<(Vec<u8>, Option<u32>)>;
    /// `false` when the CAS token no longer matches or the host refused.
    fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> bool;
    /// Starts an HTTP call to `cluster`; the answer arrives with the returned token.
    fn dispatch(
        &self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        timeout: Duration,
    ) -> Result<u32, String>;
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
    fn add(&self, metric: Metric, n: u64);
    fn count(&self, metric: Metric) {
        self.add(metric, 1);
    }
}

/// What an HTTP stream's context can do besides.
pub trait HttpHost: Host {
    /// Raw bytes: clients may send anything, and a non-UTF-8 header must not crash us.
    fn request_header(&self, name: &str) -> Option<Vec<u8>>;
    /// All request headers in one call, serialized as proxy-wasm serializes a header
    /// map (see [`crate::header_snapshot::HeaderMap`]); `None` when the host refused.
    fn request_headers(&self) -> Option<Vec<u8>>;
    fn set_request_header(&self, name: &str, value: Option<&str>);
    fn response_header(&self, name: &str) -> Option<Vec<u8>>;
    fn set_response_header(&self, name: &str, value: &str);
    /// The request body received so far (`size` bytes), while it is buffered.
    fn request_body(&self, size: usize) -> Option<Vec<u8>>;
    /// Replaces the buffered request body (`size` bytes so far) with `body`;
    /// `false` when the host refused.
    fn set_request_body(&self, size: usize, body: &[u8]) -> bool;
    /// The response body chunk of this callback (`size` bytes).
    fn response_body(&self, size: usize) -> Option<Vec<u8>>;
    fn send_reply(&self, reply: &Reply);
    fn resume_request(&self);
    /// A stream property (filter state `wasm.<name>`), for the access log. Bytes: the
    /// access-log record is a serialized protobuf (src/access_log.rs).
    fn set_property(&self, name: &str, value: &[u8]);
}
