//! Who is calling: the credential, taken from where the config says.

use std::fmt;

use crate::uri::percent_decode;

/// Longer credentials are refused before they reach the balance service or the hash.
pub const MAX_CREDENTIAL_LEN: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialSource {
    Header(String),
    Bearer,
    Query(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityError {
    Missing,
    /// `Authorization` carries a scheme other than Bearer.
    WrongScheme,
    /// Empty, too long, repeated, or with bytes a token cannot hold.
    Malformed,
}

impl fmt::Display for IdentityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IdentityError::Missing => "no credential in the request",
            IdentityError::WrongScheme => "the Authorization header does not use the Bearer scheme",
            IdentityError::Malformed => "the credential is malformed",
        })
    }
}

impl CredentialSource {
    /// `header` reads one request header (as raw bytes: clients may send anything).
    pub fn extract(
        &self,
        header: impl Fn(&str) -> Option<Vec<u8>>,
        raw_path: &str,
    ) -> Result<String, IdentityError> {
        match self {
            CredentialSource::Header(name) => {
                let value = header(name).ok_or(IdentityError::Missing)?;
                token(trim(&value))
            }
            CredentialSource::Bearer => {
                let value = header("authorization").ok_or(IdentityError::Missing)?;
                let value = trim(&value);
                let (scheme, rest) = match value.iter().position(|b| *b == b' ') {
                    Some(i) => (
                        value.get(..i).unwrap_or(&[]),
                        value.get(i + 1..).unwrap_or(&[]),
                    ),
                    None => (value, &[][..]),
                };
                if !scheme.eq_ignore_ascii_case(b"bearer") {
                    return Err(IdentityError::WrongScheme);
                }
                token(trim(rest))
            }
            CredentialSource::Query(name) => {
                let query = match raw_path.split_once('?') {
                    Some((_, q)) => q.split('#').next().unwrap_or(q),
                    None => return Err(IdentityError::Missing),
                };
                let mut found = None;
                for pair in query.split('&') {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    if percent_decode(k) == name.as_bytes() {
                        if found.is_some() {
                            // Two values: which one would the upstream use? Refuse to guess.
                            return Err(IdentityError::Malformed);
                        }
                        found = Some(percent_decode(v));
                    }
                }
                token(&found.ok_or(IdentityError::Missing)?)
            }
        }
    }
}

fn trim(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

/// Visible ASCII only, no comma: a comma is what a proxy puts between repeated
/// header values, and such a credential is ambiguous.
fn token(v: &[u8]) -> Result<String, IdentityError> {
    if v.is_empty() {
        return Err(IdentityError::Missing);
    }
    if v.len() > MAX_CREDENTIAL_LEN || !v.iter().all(|b| (0x21..=0x7e).contains(b) && *b != b',') {
        return Err(IdentityError::Malformed);
    }
    String::from_utf8(v.to_vec()).map_err(|_| IdentityError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &[u8])]) -> impl Fn(&str) -> Option<Vec<u8>> {
        let owned: Vec<(String, Vec<u8>)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_vec()))
            .collect();
        move |name: &str| {
            owned
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        }
    }

    #[test]
    fn header_source() {
        let src = CredentialSource::Header("x-api-key".into());
        assert_eq!(
            src.extract(headers(&[("x-api-key", b" k1 ")]), "/"),
            Ok("k1".into())
        );
        assert_eq!(src.extract(headers(&[]), "/"), Err(IdentityError::Missing));
        assert_eq!(
            src.extract(headers(&[("x-api-key", b"")]), "/"),
            Err(IdentityError::Missing)
        );
        assert_eq!(
            src.extract(headers(&[("x-api-key", b"a b")]), "/"),
            Err(IdentityError::Malformed)
        );
        assert_eq!(
            src.extract(headers(&[("x-api-key", b"a,b")]), "/"),
            Err(IdentityError::Malformed)
        );
        assert_eq!(
            src.extract(headers(&[("x-api-key", b"\xff\xfe")]), "/"),
            Err(IdentityError::Malformed)
        );
        assert_eq!(
            src.extract(headers(&[("x-api-key", b"a\x01")]), "/"),
            Err(IdentityError::Malformed)
        );
        let long = vec![b'k'; MAX_CREDENTIAL_LEN + 1];
        assert_eq!(
            src.extract(headers(&[("x-api-key", &long)]), "/"),
            Err(IdentityError::Malformed)
        );
        let max = vec![b'k'; MAX_CREDENTIAL_LEN];
        assert!(src.extract(headers(&[("x-api-key", &max)]), "/").is_ok());
    }

    #[test]
    fn bearer_source() {
        let src = CredentialSource::Bearer;
        assert_eq!(
            src.extract(headers(&[("authorization", b"Bearer tok")]), "/"),
            Ok("tok".into())
        );
        assert_eq!(
            src.extract(headers(&[("authorization", b"bearer  tok ")]), "/"),
            Ok("tok".into())
        );
        assert_eq!(
            src.extract(headers(&[("authorization", b"Basic dXNlcjpwYXNz")]), "/"),
            Err(IdentityError::WrongScheme)
        );
        assert_eq!(
            src.extract(headers(&[("authorization", b"Bearer")]), "/"),
            Err(IdentityError::Missing)
        );
        assert_eq!(src.extract(headers(&[]), "/"), Err(IdentityError::Missing));
    }

    #[test]
    fn query_source() {
        let src = CredentialSource::Query("api_key".into());
        let none = headers(&[]);
        assert_eq!(src.extract(&none, "/p?a=1&api_key=k%2D1"), Ok("k-1".into()));
        assert_eq!(src.extract(&none, "/p?api_key=k#frag"), Ok("k".into()));
        assert_eq!(
            src.extract(&none, "/p?other=1"),
            Err(IdentityError::Missing)
        );
        assert_eq!(src.extract(&none, "/p"), Err(IdentityError::Missing));
        assert_eq!(
            src.extract(&none, "/p?api_key=a&api_key=b"),
            Err(IdentityError::Malformed)
        );
        assert_eq!(
            src.extract(&none, "/p?api_key="),
            Err(IdentityError::Missing)
        );
    }

    /// The reason is what a client reads in the 401's detail: each error says its own.
    #[test]
    fn each_error_says_what_is_wrong() {
        assert_eq!(
            IdentityError::Missing.to_string(),
            "no credential in the request"
        );
        assert!(IdentityError::WrongScheme.to_string().contains("Bearer"));
        assert!(IdentityError::Malformed.to_string().contains("malformed"));
    }
}
