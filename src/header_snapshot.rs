//! The request headers read once: one `proxy_get_header_map_pairs` (one crossing into
//! Envoy and one allocation callback) instead of one `get_header_map_value` per header,
//! and writes that would change nothing (removing an absent header, setting a header to
//! the one value it has) are not sent at all. Used for the request-headers callback,
//! where the gate reads several headers and decides most requests.

use std::cell::{Cell, RefCell};
use std::ops::Range;
use std::time::Duration;

use crate::host::{Host, HttpHost};
use crate::metrics::Metric;
use crate::response::Reply;

/// A header map in proxy-wasm's serialized form: the pair count (u32 LE), then each
/// pair's name and value sizes (u32 LE each), then each name and value followed by a NUL.
/// Walked once, when read: the gate looks up several headers per request, and each
/// lookup then compares names only (no sizes decoded again, no offsets checked again).
#[derive(Debug, Default)]
pub struct HeaderMap {
    raw: Vec<u8>,
    /// Where each pair's name and value are in `raw`, in order; a malformed map ends early.
    spans: Vec<(Range<usize>, Range<usize>)>,
}

impl HeaderMap {
    pub fn from_serialized(raw: Vec<u8>) -> HeaderMap {
        let spans = spans(&raw);
        HeaderMap { raw, spans }
    }

    /// The serialized form of `pairs`.
    pub fn serialize<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Vec<u8> {
        let pairs: Vec<_> = pairs.into_iter().collect();
        let mut out = Vec::new();
        out.extend_from_slice(&u32_le(pairs.len()));
        for (name, value) in &pairs {
            out.extend_from_slice(&u32_le(name.len()));
            out.extend_from_slice(&u32_le(value.len()));
        }
        for (name, value) in &pairs {
            out.extend_from_slice(name.as_bytes());
            out.push(0);
            out.extend_from_slice(value);
            out.push(0);
        }
        out
    }

    /// The pairs in order; a malformed map ends early (bytes from the host are checked,
    /// never trusted to be well-formed). The tests' view of what was decoded.
    #[cfg(test)]
    fn pairs(&self) -> impl Iterator<Item = (&[u8], &[u8])> + '_ {
        self.spans.iter().filter_map(|(name, value)| {
            Some((self.raw.get(name.clone())?, self.raw.get(value.clone())?))
        })
    }

    /// The first value of `name`, as Envoy's `get_header_map_value` answers.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.values(name).next()
    }

    /// Every value of `name`, in order (borrowed from the map, not from `name`).
    fn values<'m, 'n>(&'m self, name: &'n str) -> impl Iterator<Item = &'m [u8]> + use<'m, 'n> {
        self.spans
            .iter()
            .filter(move |(n, _)| self.is_named(n, name))
            .filter_map(|(_, v)| self.raw.get(v.clone()))
    }

    /// Whether the name at `span` is `name`, in any case. Most lookups are for headers a
    /// request does not carry (payments, say): the length alone tells most names apart.
    fn is_named(&self, span: &Range<usize>, name: &str) -> bool {
        span.len() == name.len()
            && self
                .raw
                .get(span.clone())
                .is_some_and(|n| n.eq_ignore_ascii_case(name.as_bytes()))
    }
}

/// The name and value spans of a serialized map's well-formed pairs, up to the first
/// one that is not (its sizes point past the end, or the arithmetic would overflow).
fn spans(raw: &[u8]) -> Vec<(Range<usize>, Range<usize>)> {
    let count = read_u32(raw, 0).unwrap_or(0);
    let Some(mut data) = count.checked_mul(8).and_then(|n| n.checked_add(4)) else {
        return Vec::new();
    };
    // Each pair takes at least 10 bytes (two sizes, two NULs): a count from a short or
    // lying buffer reserves no more than the buffer can hold.
    let mut spans = Vec::with_capacity(count.min(raw.len() / 10));
    for i in 0..count {
        let span = (|| {
            let sizes = i.checked_mul(8)?.checked_add(4)?;
            let name_len = read_u32(raw, sizes)?;
            let value_len = read_u32(raw, sizes.checked_add(4)?)?;
            let name_end = data.checked_add(name_len)?;
            let value_start = name_end.checked_add(1)?;
            let value_end = value_start.checked_add(value_len)?;
            // The value's end inside the buffer puts the name's there too.
            raw.get(data..value_end)?;
            Some((data..name_end, value_start..value_end))
        })();
        let Some((name, value)) = span else { break };
        data = match value.end.checked_add(1) {
            Some(next) => next,
            None => break,
        };
        spans.push((name, value));
    }
    spans
}

fn u32_le(n: usize) -> [u8; 4] {
    u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes()
}

fn read_u32(raw: &[u8], at: usize) -> Option<usize> {
    let bytes: [u8; 4] = raw.get(at..at.checked_add(4)?)?.try_into().ok()?;
    usize::try_from(u32::from_le_bytes(bytes)).ok()
}

/// A stream's host whose request headers are read at most once (when first asked for),
/// for the length of one callback: the map is not kept past it.
pub struct Snapshot<'a, H: HttpHost> {
    host: &'a H,
    map: RefCell<Option<HeaderMap>>,
    /// The header map could not be read (or is not to be): ask header by header.
    unreadable: Cell<bool>,
    /// What this callback wrote, by name (`None`: removed); newest last.
    written: RefCell<Vec<(String, Option<String>)>>,
}

impl<'a, H: HttpHost> Snapshot<'a, H> {
    pub fn new(host: &'a H) -> Snapshot<'a, H> {
        Snapshot {
            host,
            map: RefCell::new(None),
            unreadable: Cell::new(false),
            written: RefCell::new(Vec::new()),
        }
    }

    /// A host that reads header by header: for the callbacks after the headers (the
    /// glue hands the gate one host type, so the gate is compiled once).
    pub fn passthrough(host: &'a H) -> Snapshot<'a, H> {
        let s = Snapshot::new(host);
        s.unreadable.set(true);
        s
    }

    /// Runs `f` on the map, read from the host the first time; `None` if unreadable.
    fn with_map<T>(&self, f: impl FnOnce(&HeaderMap) -> T) -> Option<T> {
        if self.unreadable.get() {
            return None;
        }
        let mut map = self.map.borrow_mut();
        if map.is_none() {
            match self.host.request_headers() {
                Some(raw) => *map = Some(HeaderMap::from_serialized(raw)),
                None => {
                    self.unreadable.set(true);
                    return None;
                }
            }
        }
        map.as_ref().map(f)
    }

    fn last_write(&self, name: &str) -> Option<Option<String>> {
        self.written
            .borrow()
            .iter()
            .rev()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    }
}

impl<H: HttpHost> Host for Snapshot<'_, H> {
    fn shared_get(&self, key: &str) -> Option<(Vec<u8>, Option<u32>)> {
        self.host.shared_get(key)
    }
    fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> bool {
        self.host.shared_set(key, value, cas)
    }
    fn dispatch(
        &self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        timeout: Duration,
    ) -> Result<u32, String> {
        self.host.dispatch(cluster, headers, body, timeout)
    }
    fn now_ms(&self) -> u64 {
        self.host.now_ms()
    }
    fn add(&self, metric: Metric, n: u64) {
        self.host.add(metric, n)
    }
}

impl<H: HttpHost> HttpHost for Snapshot<'_, H> {
    fn request_header(&self, name: &str) -> Option<Vec<u8>> {
        if let Some(written) = self.last_write(name) {
            return written.map(String::into_bytes);
        }
        match self.with_map(|m| m.get(name).map(<[u8]>::to_vec)) {
            Some(value) => value,
            None => self.host.request_header(name),
        }
    }

    fn request_headers(&self) -> Option<Vec<u8>> {
        self.host.request_headers()
    }

    fn set_request_header(&self, name: &str, value: Option<&str>) {
        let unchanged = match self.last_write(name) {
            Some(written) => written.as_deref() == value,
            // One walk of the map: the first value, then whether there is another.
            None => self
                .with_map(|m| {
                    let mut values = m.values(name);
                    match value {
                        None => values.next().is_none(),
                        Some(v) => values.next() == Some(v.as_bytes()) && values.next().is_none(),
                    }
                })
                .unwrap_or(false),
        };
        if unchanged {
            return;
        }
        self.host.set_request_header(name, value);
        // Kept only over a map that was read: without one, every read asks the host.
        if self.map.borrow().is_some() {
            self.written
                .borrow_mut()
                .push((name.to_string(), value.map(str::to_string)));
        }
    }

    fn response_header(&self, name: &str) -> Option<Vec<u8>> {
        self.host.response_header(name)
    }
    fn set_response_header(&self, name: &str, value: &str) {
        self.host.set_response_header(name, value)
    }
    fn request_body(&self, size: usize) -> Option<Vec<u8>> {
        self.host.request_body(size)
    }
    fn set_request_body(&self, size: usize, body: &[u8]) -> bool {
        self.host.set_request_body(size, body)
    }
    fn response_body(&self, size: usize) -> Option<Vec<u8>> {
        self.host.response_body(size)
    }
    fn send_reply(&self, reply: &Reply) {
        self.host.send_reply(reply)
    }
    fn resume_request(&self) {
        self.host.resume_request()
    }
    fn set_property(&self, name: &str, value: &[u8]) {
        self.host.set_property(name, value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{FakeHost, HostCall};

    #[test]
    fn serialized_maps_read_back() {
        let raw = HeaderMap::serialize([(":path", &b"/a"[..]), ("x-k", b""), ("x-k", b"2")]);
        let map = HeaderMap::from_serialized(raw);
        let pairs: Vec<_> = map.pairs().collect();
        assert_eq!(
            pairs,
            [(&b":path"[..], &b"/a"[..]), (b"x-k", b""), (b"x-k", b"2")]
        );
        assert_eq!(map.get("X-K"), Some(&b""[..]), "the first value, any case");
        assert_eq!(map.get("absent"), None);
    }

    #[test]
    fn malformed_maps_end_early_and_never_panic() {
        let raw = HeaderMap::serialize([("a", &b"1"[..]), ("b", b"2")]);
        for cut in 0..raw.len() {
            let map = HeaderMap::from_serialized(raw[..cut].to_vec());
            assert!(map.pairs().count() <= 2);
        }
        let huge = HeaderMap::from_serialized(vec![0xff; 12]);
        assert_eq!(huge.pairs().count(), 0);
        assert_eq!(HeaderMap::default().get("a"), None);
    }

    #[test]
    fn one_map_read_and_no_idle_writes() {
        let host = FakeHost::request(
            "GET",
            "/x",
            &[("x-api-key", "k"), ("dup", "1"), ("dup", "2")],
        );
        let s = Snapshot::new(&host);
        assert_eq!(s.request_header(":method"), Some(b"GET".to_vec()));
        assert_eq!(s.request_header("x-api-key"), Some(b"k".to_vec()));
        assert_eq!(s.request_header("dup"), Some(b"1".to_vec()));
        s.set_request_header("x-farebox-account", None); // absent: nothing to do
        s.set_request_header("x-api-key", Some("k")); // already so: nothing to do
        s.set_request_header("dup", Some("1")); // two values: pinned to one
        s.set_request_header("x-farebox-account", Some("acct"));
        s.set_request_header("x-farebox-account", Some("acct"));
        assert_eq!(
            s.request_header("x-farebox-account"),
            Some(b"acct".to_vec())
        );
        assert_eq!(
            host.host_call_counts(),
            [
                (HostCall::RequestHeaders, 1),
                (HostCall::SetRequestHeader, 2)
            ]
        );
        assert_eq!(host.upstream_header("dup").as_deref(), Some("1"));
        assert_eq!(
            host.upstream_header("x-farebox-account").as_deref(),
            Some("acct")
        );
    }

    #[test]
    fn an_unreadable_map_falls_back_to_single_reads() {
        let host = FakeHost::request("GET", "/x", &[]);
        host.headers_locked.set(true);
        let s = Snapshot::new(&host);
        assert_eq!(s.request_header(":path"), None);
        assert_eq!(s.request_header(":method"), None);
        assert_eq!(
            host.host_call_counts(),
            [(HostCall::RequestHeader, 2), (HostCall::RequestHeaders, 1)]
        );
    }
}
