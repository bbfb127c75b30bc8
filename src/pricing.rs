//! Route rules: which price a request pays. Rules are tried in order and the
//! first match wins; a request no rule matches pays the default cost.

use std::fmt;

use crate::mcp::McpPricing;
use crate::uri::readings;
use crate::usage::UsageSpec;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathPattern {
    Exact(String),
    Prefix(String),
    /// Segment-wise glob: `*` stands for exactly one non-empty segment.
    Glob(Vec<GlobSegment>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GlobSegment {
    Literal(String),
    Any,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PatternError {
    NoLeadingSlash,
    DoubleStar,
    PartialStar,
    EmptySegment,
}

impl fmt::Display for PatternError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PatternError::NoLeadingSlash => "must start with '/'",
            PatternError::DoubleStar => "'**' is not supported; use a prefix rule",
            PatternError::PartialStar => "'*' must stand for a whole segment, as in /v1/*/infer",
            PatternError::EmptySegment => "empty segment ('//')",
        })
    }
}

impl PathPattern {
    pub fn glob(pattern: &str) -> Result<PathPattern, PatternError> {
        let rest = pattern
            .strip_prefix('/')
            .ok_or(PatternError::NoLeadingSlash)?;
        let mut segments = Vec::new();
        let parts: Vec<&str> = rest.split('/').collect();
        let last = parts.len().saturating_sub(1);
        for (i, part) in parts.into_iter().enumerate() {
            if part.contains("**") {
                return Err(PatternError::DoubleStar);
            }
            if part == "*" {
                segments.push(GlobSegment::Any);
            } else if part.contains('*') {
                return Err(PatternError::PartialStar);
            } else if part.is_empty() && i != last {
                return Err(PatternError::EmptySegment);
            } else {
                segments.push(GlobSegment::Literal(part.to_string()));
            }
        }
        Ok(PathPattern::Glob(segments))
    }

    /// `path` must already be normalized (see [`crate::uri::normalize_path`]).
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathPattern::Exact(p) => path == p,
            PathPattern::Prefix(p) => path.starts_with(p.as_str()),
            PathPattern::Glob(segments) => {
                let mut parts = path.strip_prefix('/').unwrap_or(path).split('/');
                for seg in segments {
                    match (seg, parts.next()) {
                        (GlobSegment::Any, Some(part)) if !part.is_empty() => {}
                        (GlobSegment::Literal(lit), Some(part)) if lit == part => {}
                        _ => return false,
                    }
                }
                parts.next().is_none()
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub name: String,
    /// Upper-case method names; `None` matches every method.
    pub methods: Option<Vec<String>>,
    pub pattern: PathPattern,
    /// The price; with `usage`, the estimate held until the response tells the real one.
    pub cost: u64,
    /// Priced by usage reported in the response (LLM tokens).
    pub usage: Option<UsageSpec>,
    /// Priced by JSON-RPC method and MCP tool, read from the request body.
    pub mcp: Option<McpPricing>,
}

impl Route {
    fn matches(&self, method: &str, path: &str) -> bool {
        let method_ok = match &self.methods {
            None => true,
            Some(ms) => ms.iter().any(|m| m.eq_ignore_ascii_case(method)),
        };
        method_ok && self.pattern.matches(path)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pricing {
    pub routes: Vec<Route>,
    pub default_cost: u64,
    pub default_route: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Price<'a> {
    pub route: &'a str,
    pub cost: u64,
    /// The matching rule, if any (none: the default price).
    pub rule: Option<&'a Route>,
}

impl Pricing {
    /// Prices a request by every reading of its raw `:path` and keeps the dearest;
    /// the path returned is the normalized one, for the balance service.
    pub fn price_request(&self, method: &str, raw_path: &str) -> (Price<'_>, String) {
        let mut readings = readings(raw_path).into_iter();
        let normalized = readings.next().unwrap_or_else(|| "/".to_string());
        let mut best = self.price(method, &normalized);
        for other in readings {
            let p = self.price(method, &other);
            if p.cost > best.cost {
                best = p;
            }
        }
        (best, normalized)
    }

    /// `path` must already be normalized (see [`crate::uri::normalize_path`]).
    pub fn price(&self, method: &str, path: &str) -> Price<'_> {
        match self.routes.iter().find(|r| r.matches(method, path)) {
            Some(r) => Price {
                route: &r.name,
                cost: r.cost,
                rule: Some(r),
            },
            None => Price {
                route: &self.default_route,
                cost: self.default_cost,
                rule: None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(name: &str, methods: Option<&[&str]>, pattern: PathPattern, cost: u64) -> Route {
        Route {
            name: name.into(),
            methods: methods.map(|ms| ms.iter().map(|m| m.to_string()).collect()),
            pattern,
            cost,
            usage: None,
            mcp: None,
        }
    }

    fn pricing() -> Pricing {
        Pricing {
            routes: vec![
                route(
                    "health",
                    Some(&["GET"]),
                    PathPattern::Exact("/health".into()),
                    0,
                ),
                route("docs", None, PathPattern::Prefix("/docs/".into()), 0),
                route(
                    "infer",
                    Some(&["POST"]),
                    PathPattern::glob("/v1/models/*/infer").unwrap(),
                    5,
                ),
                route("models", None, PathPattern::Prefix("/v1/models".into()), 2),
            ],
            default_cost: 1,
            default_route: "default".into(),
        }
    }

    fn rc<'a>(p: &'a Pricing, method: &str, path: &str) -> (&'a str, u64) {
        let price = p.price(method, path);
        (price.route, price.cost)
    }

    #[test]
    fn first_match_wins_and_default_applies() {
        let p = pricing();
        assert_eq!(rc(&p, "GET", "/health"), ("health", 0));
        assert_eq!(rc(&p, "POST", "/health"), ("default", 1));
        assert_eq!(rc(&p, "GET", "/docs/a/b"), ("docs", 0));
        assert_eq!(rc(&p, "POST", "/v1/models/gpt/infer"), ("infer", 5));
        // The glob needs POST; GET falls through to the prefix rule.
        assert_eq!(rc(&p, "GET", "/v1/models/gpt/infer"), ("models", 2));
        assert_eq!(rc(&p, "GET", "/other"), ("default", 1));
    }

    #[test]
    fn methods_match_in_any_case() {
        let p = pricing();
        assert_eq!(rc(&p, "post", "/v1/models/x/infer").1, 5);
        assert_eq!(rc(&p, "gEt", "/health").1, 0);
    }

    #[test]
    fn glob_star_is_one_non_empty_segment() {
        let g = PathPattern::glob("/v1/models/*/infer").unwrap();
        assert!(g.matches("/v1/models/abc/infer"));
        assert!(!g.matches("/v1/models/infer"));
        assert!(!g.matches("/v1/models/a/b/infer"));
        assert!(!g.matches("/v1/models/abc/infer/more"));
        assert!(!g.matches("/v1/models//infer"));
        let tail = PathPattern::glob("/a/*").unwrap();
        assert!(tail.matches("/a/b"));
        assert!(!tail.matches("/a/"));
        assert!(!tail.matches("/a"));
    }

    #[test]
    fn bad_globs_are_refused() {
        assert_eq!(PathPattern::glob("a/b"), Err(PatternError::NoLeadingSlash));
        assert_eq!(PathPattern::glob("/a/**"), Err(PatternError::DoubleStar));
        assert_eq!(PathPattern::glob("/a*b"), Err(PatternError::PartialStar));
        assert_eq!(PathPattern::glob("/a//b"), Err(PatternError::EmptySegment));
        assert!(PathPattern::glob("/a/b/").is_ok());
    }

    #[test]
    fn encoding_tricks_pay_the_dearest_reading() {
        let p = pricing();
        // A priced path dressed up as a free one still pays, whichever way it is read.
        for tricky in [
            "/docs/..%2fv1/models/m/infer",
            "/docs/%2e%2e/v1/models/m/infer",
            "/docs/..%2Fv1%2Fmodels%2Fm%2Finfer",
        ] {
            let (price, _) = p.price_request("POST", tricky);
            assert_eq!((price.route, price.cost), ("infer", 5), "{tricky}");
        }
        // And the other way: what the RFC reads as a priced path is priced even when a
        // decoding reading lands on a free one.
        let (price, path) = p.price_request("GET", "/v1/models%2F..%2F..%2Fhealth");
        assert_eq!(
            (price.cost, path.as_str()),
            (2, "/v1/models%2F..%2F..%2Fhealth")
        );
        let (price, _) = p.price_request("GET", "/v1/models/%2e%2e/%2e%2e/health");
        assert_eq!(
            price.cost, 2,
            "an upstream that does not decode %2e sees /v1/models/..."
        );
    }

    #[test]
    fn glob_literals_must_match_their_segment() {
        let g = PathPattern::glob("/v1/models/*/infer").unwrap();
        assert!(!g.matches("/v1/models/abc/train"));
        assert!(!g.matches("/v2/models/abc/infer"));
        assert!(!g.matches("/v1/files/abc/infer"));
    }

    #[test]
    fn a_reading_that_costs_the_same_keeps_the_normalized_paths_rule() {
        // "/a%2Fb" reads as "/a%2Fb" (the normalized path, rule "escaped") and, decoded,
        // as "/a/b" (rule "plain"), at the same price: the rule of the path sent to the
        // service is kept, and only a dearer reading replaces it.
        let p = Pricing {
            routes: vec![
                route("escaped", None, PathPattern::Exact("/a%2Fb".into()), 3),
                route("plain", None, PathPattern::Exact("/a/b".into()), 3),
            ],
            default_cost: 1,
            default_route: "default".into(),
        };
        let (price, path) = p.price_request("GET", "/a%2Fb");
        assert_eq!(
            (price.route, price.cost, path.as_str()),
            ("escaped", 3, "/a%2Fb")
        );
    }
}
