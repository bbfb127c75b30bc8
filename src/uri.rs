//! Request paths as an upstream reads them: query and fragment cut off,
//! percent-escapes decoded, dot segments resolved. Pricing, the gate and the
//! credential's query parameter all read paths the same way through here.

/// The path sent to the balance service and logged: query and fragment cut off,
/// escapes of unreserved characters decoded (`%2e` is `.`), dot segments resolved
/// as RFC 3986 does, then repeated slashes merged. `%2F` stays as it is: it is
/// data, not a separator, to an upstream that follows the RFC.
pub fn normalize_path(raw: &str) -> String {
    reading(raw, Decode::Unreserved)
}

/// How much of the path's percent-encoding an upstream might decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decode {
    Nothing,
    Unreserved,
    Everything,
}

fn reading(raw: &str, decode: Decode) -> String {
    let end = raw
        .bytes()
        .position(|b| b == b'?' || b == b'#')
        .unwrap_or(raw.len());
    let path = raw.get(..end).unwrap_or(raw);
    // Nearly every request's path is already normal: priced as written, it costs no
    // decoding, dot-segment or slash pass (bench/INSTRUCTIONS.md).
    if is_normal(path) {
        return path.to_string();
    }
    normalized(path, decode)
}

/// [`reading`] of a path already cut at its query, the long way.
fn normalized(path: &str, decode: Decode) -> String {
    let decoded = match decode {
        Decode::Nothing => path.to_string(),
        Decode::Unreserved => decode_unreserved(path),
        Decode::Everything => String::from_utf8_lossy(&percent_decode(path)).into_owned(),
    };
    merge_slashes(&remove_dot_segments(&decoded))
}

/// A path every reading leaves as it is (the common case, checked before building
/// anything): absolute, no escapes, no empty, `.` or `..` segment.
/// One pass over the bytes: every request's path goes through here, and `str`'s
/// substring search (for `//`) costs more to set up than this whole walk.
fn is_normal(path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    if rest.as_bytes().contains(&b'%') {
        return false;
    }
    let mut segments = rest.as_bytes().split(|&b| b == b'/').peekable();
    while let Some(seg) = segments.next() {
        // An empty segment is `//`, unless it is the last one (a trailing slash).
        if seg == b"." || seg == b".." || (seg.is_empty() && segments.peek().is_some()) {
            return false;
        }
    }
    true
}

/// Every way an upstream might read the path, the normalized one first. Upstreams
/// differ on `%2F` and `%2e%2e`, so a request is priced by the dearest reading:
/// no escaping trick can make a priced path cost less than it does.
pub fn readings(raw: &str) -> Vec<String> {
    let normalized = normalize_path(raw);
    if !raw.contains('%') {
        return vec![normalized];
    }
    let mut all = vec![normalized];
    for decode in [Decode::Everything, Decode::Nothing] {
        let r = reading(raw, decode);
        if !all.contains(&r) {
            all.push(r);
        }
    }
    all
}

/// RFC 3986 section 5.2.4, on an absolute path: `.` and `..` segments go, an empty
/// segment counts as a segment.
fn remove_dot_segments(path: &str) -> String {
    let body = path.strip_prefix('/').unwrap_or(path);
    let mut out: Vec<&str> = Vec::new();
    let mut trailing = false;
    for seg in body.split('/') {
        trailing = false;
        match seg {
            "." => trailing = true,
            ".." => {
                out.pop();
                trailing = true;
            }
            s => out.push(s),
        }
    }
    let mut result = String::with_capacity(path.len() + 1);
    for seg in &out {
        result.push('/');
        result.push_str(seg);
    }
    if trailing || result.is_empty() {
        result.push('/');
    }
    result
}

fn merge_slashes(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        if c == '/' && out.ends_with('/') {
            continue;
        }
        out.push(c);
    }
    out
}

/// Decodes `%XX` only where XX is an unreserved character (RFC 3986 2.3), as every
/// normalizer may.
fn decode_unreserved(path: &str) -> String {
    let unreserved = |c: u8| c.is_ascii_alphanumeric() || b"-._~".contains(&c);
    String::from_utf8_lossy(&decode_where(path, unreserved)).into_owned()
}

/// Decodes every `%XX` escape (a query parameter's name and value are data).
pub fn percent_decode(input: &str) -> Vec<u8> {
    decode_where(input, |_| true)
}

/// Decodes the `%XX` escapes whose byte `wanted` accepts; leaves the rest as written.
fn decode_where(input: &str, wanted: impl Fn(u8) -> bool) -> Vec<u8> {
    let bytes = input.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hi = bytes.get(i + 1).and_then(|c| hex_value(*c));
            let lo = bytes.get(i + 2).and_then(|c| hex_value(*c));
            if let (Some(hi), Some(lo)) = (hi, lo) {
                let c = hi << 4 | lo;
                if wanted(c) {
                    out.push(c);
                    i += 3;
                    continue;
                }
            }
        }
        out.push(b);
        i += 1;
    }
    out
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_paths_read_as_the_long_way_reads_them() {
        for p in [
            "/",
            "/a",
            "/a/",
            "/free/bench",
            "/v1/models/x/infer",
            "/a.b/c..d/.e",
            "/a/...",
            "/a/./b",
            "/a/../b",
            "/a//b",
            "//",
            "/a/.",
            "/a/..",
            "a/b",
            "",
            "/%2e%2e/x",
            "/a%2Fb",
            "/~user/-_.",
        ] {
            for decode in [Decode::Unreserved, Decode::Everything, Decode::Nothing] {
                if is_normal(p) {
                    assert_eq!(normalized(p, decode), p, "{p} {decode:?}");
                }
            }
        }
        assert!(is_normal("/free/bench"));
        assert!(!is_normal("/a/./b") && !is_normal("/a//b") && !is_normal("/%41"));
    }

    #[test]
    fn normalization_defeats_encoding_tricks() {
        assert_eq!(normalize_path("/health?x=1"), "/health");
        assert_eq!(normalize_path("/health#frag"), "/health");
        assert_eq!(normalize_path("//v1//models/a/infer"), "/v1/models/a/infer");
        assert_eq!(
            normalize_path("/health/../v1/models/a/infer"),
            "/v1/models/a/infer"
        );
        assert_eq!(normalize_path("/health/%2e%2e/v1/x"), "/v1/x");
        // %2F is data to an RFC upstream: the normalized path keeps it...
        assert_eq!(
            normalize_path("/health%2F..%2Fv1%2Fx"),
            "/health%2F..%2Fv1%2Fx"
        );
        // ...but a decoding upstream reads it as a separator, and that reading counts too.
        assert!(readings("/health%2F..%2Fv1%2Fx").contains(&"/v1/x".to_string()));
        assert_eq!(normalize_path("/docs/./a"), "/docs/a");
        assert_eq!(normalize_path("/../../etc"), "/etc");
        assert_eq!(normalize_path(""), "/");
        assert_eq!(normalize_path("/docs/"), "/docs/");
        assert_eq!(normalize_path("/a/b/.."), "/a/");
        assert_eq!(normalize_path("/%zz%4"), "/%zz%4");
        assert_eq!(normalize_path("/%ff"), "/%ff");
        assert_eq!(
            normalize_path("/v1/models/m1/infer//.."),
            "/v1/models/m1/infer/"
        );
        assert_eq!(normalize_path("%"), "/%");
    }

    #[test]
    fn every_escape_decodes_to_its_byte_in_either_case() {
        let all: Vec<u8> = (0..=255).collect();
        let upper: String = all.iter().map(|b| format!("%{b:02X}")).collect();
        let lower: String = all.iter().map(|b| format!("%{b:02x}")).collect();
        assert_eq!(percent_decode(&upper), all);
        assert_eq!(percent_decode(&lower), all);
        // Unreserved characters written as escapes read as themselves in the normalized path.
        assert_eq!(normalize_path("/%41%62%63%2D%30%39%5F%7e"), "/Abc-09_~");
    }
}
