//! The HTTP `Payment` authentication scheme (draft-ryan-httpauth-payment, the
//! "Machine Payments Protocol") with the `evm` payment method's `charge`
//! intent, as the official clients (pympp, mppx) implement it: the payer signs
//! an EIP-3009 `transferWithAuthorization` of the token to the recipient, and
//! the server settles it on chain. That is the very authorization x402's
//! `exact` EVM scheme carries, so a verified credential is turned into an x402
//! `PaymentPayload` here and settled through the same facilitator, under the
//! same one-use id (`x402:<payer>:<nonce>`).
//!
//! What the service checks before it asks the facilitator:
//! - the challenge echoed in the credential is one this service issued: its
//!   `id` is an HMAC of the method, intent, terms and expiry, and of the realm
//!   when the service names it (`--x402-realm`; else the filter names the
//!   request's host, which the service does not see, and the realm is bound
//!   only through the authorization's nonce);
//! - it has not expired;
//! - its terms are this request's (amount for the route's price, token,
//!   recipient, chain);
//! - the authorization pays those terms, and its nonce is the challenge's
//!   hash (`keccak256(JSON.stringify([id, realm]))`), so one signature answers
//!   one challenge.
//!
//! Failures carry the draft's problem types (`https://paymentauth.org/problems/…`).

use crate::config::X402;
use crate::util::{base64_decode, keccak256_hex, random_hex};
use hmac::{KeyInit, Mac};
use serde_json::{json, Value};

/// The payment method and intent the challenges name.
pub const METHOD: &str = "evm";
pub const INTENT: &str = "charge";
/// The `evm` method's only credential type: an EIP-3009 authorization.
pub const CREDENTIAL_TYPE: &str = "authorization";
/// Hex digits of random salt a challenge id starts with.
const SALT_LEN: usize = 16;
/// The draft's registry of problem types.
pub const PROBLEM_BASE: &str = "https://paymentauth.org/problems/";

/// The draft's problem types a payment failure answers with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Problem {
    /// No credential: pay one of the challenges.
    PaymentRequired,
    /// The challenge has expired: take a fresh one.
    PaymentExpired,
    /// The proof does not pay this challenge (or the facilitator refused it).
    VerificationFailed,
    /// A method this service does not take.
    MethodUnsupported,
    /// Not a credential (base64url JSON with `challenge` and `payload`).
    MalformedCredential,
    /// A challenge this service did not issue.
    InvalidChallenge,
}

impl Problem {
    pub fn slug(self) -> &'static str {
        match self {
            Problem::PaymentRequired => "payment-required",
            Problem::PaymentExpired => "payment-expired",
            Problem::VerificationFailed => "verification-failed",
            Problem::MethodUnsupported => "method-unsupported",
            Problem::MalformedCredential => "malformed-credential",
            Problem::InvalidChallenge => "invalid-challenge",
        }
    }
}

/// Why a credential is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub problem: Problem,
    pub detail: String,
}

fn refuse(problem: Problem, detail: impl Into<String>) -> Refusal {
    Refusal {
        problem,
        detail: detail.into(),
    }
}

/// The key challenge ids are made with: configured, or random per process.
pub struct ChallengeKey(Vec<u8>);

impl ChallengeKey {
    pub fn new(x402: Option<&X402>) -> ChallengeKey {
        let secret = x402.and_then(|x| x.challenge_secret.clone());
        ChallengeKey(secret.unwrap_or_else(|| random_hex(32)).into_bytes())
    }

    /// `id`: HMAC-SHA256 over what the credential echoes back (method, intent,
    /// terms, expiry), so the service keeps no state per challenge and a changed
    /// echo is refused. `realm` is the service's (`--x402-realm`), bound as
    /// the draft requires; empty when the filter names the request's host,
    /// which the service does not see (the authorization's nonce binds it
    /// with the id).
    ///
    /// It starts with a random salt (SALT_LEN hex digits, covered by the HMAC):
    /// two challenges of the same terms in the same second differ, so do their
    /// nonces, and a payer may pay both.
    fn id(&self, realm: &str, request: &Terms, expires: &str) -> String {
        self.id_salted(&random_hex(SALT_LEN / 2), realm, request, expires)
    }

    /// The id `echoed` should be, if this service issued it.
    fn reissue(&self, echoed: &str, realm: &str, request: &Terms, expires: &str) -> String {
        let salt = echoed.get(..SALT_LEN).unwrap_or_default();
        self.id_salted(salt, realm, request, expires)
    }

    fn id_salted(&self, salt: &str, realm: &str, request: &Terms, expires: &str) -> String {
        let mut mac = match hmac::Hmac::<sha2::Sha256>::new_from_slice(&self.0) {
            Ok(m) => m,
            // HMAC takes keys of any length; unreachable in practice.
            Err(_) => return String::new(),
        };
        for part in [
            salt,
            realm,
            METHOD,
            INTENT,
            &request.amount,
            &request.currency.to_ascii_lowercase(),
            &request.recipient.to_ascii_lowercase(),
            &request.chain_id.to_string(),
            expires,
        ] {
            mac.update(part.as_bytes());
            mac.update(b"\n");
        }
        format!(
            "{salt}{}",
            crate::util::base64url(&mac.finalize().into_bytes())
        )
    }
}

/// A charge's terms: what the `request` parameter carries.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Terms {
    amount: String,
    currency: String,
    recipient: String,
    chain_id: u64,
}

impl Terms {
    fn of(x402: &X402, amount: &str) -> Terms {
        Terms {
            amount: amount.to_owned(),
            currency: x402.asset.clone(),
            recipient: x402.pay_to.clone(),
            chain_id: chain_id(x402),
        }
    }

    fn request(&self, decimals: u8) -> Value {
        json!({
            "amount": self.amount,
            "currency": self.currency,
            "recipient": self.recipient,
            "methodDetails": {
                "chainId": self.chain_id,
                "credentialTypes": [CREDENTIAL_TYPE],
                "decimals": decimals,
            },
        })
    }
}

/// The EVM chain id of the configured network (`eip155:<id>`, checked at start).
fn chain_id(x402: &X402) -> u64 {
    x402.network
        .strip_prefix("eip155:")
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// One `evm`/`charge` challenge for `amount` atomic units, expiring at `expires`
/// (RFC 3339). The filter writes it as `WWW-Authenticate: Payment …`.
pub fn challenge(
    x402: &X402,
    key: &ChallengeKey,
    amount: &str,
    description: &str,
    expires: &str,
) -> Value {
    let terms = Terms::of(x402, amount);
    let mut c = json!({
        "id": key.id(x402.realm.as_deref().unwrap_or_default(), &terms, expires),
        "method": METHOD,
        "intent": INTENT,
        "request": terms.request(x402.asset_decimals),
        "expires": expires,
        "description": description,
    });
    if let Some(realm) = &x402.realm {
        c["realm"] = json!(realm);
    }
    c
}

/// The `challengeHash` the `evm` method signs as the EIP-3009 nonce.
pub fn challenge_hash(id: &str, realm: &str) -> String {
    let encoded = serde_json::to_string(&[id, realm]).unwrap_or_default();
    keccak256_hex(encoded.as_bytes())
}

/// A credential checked against this request's terms: the x402 `PaymentPayload`
/// that settles it, and the challenge it answers.
#[derive(Debug)]
pub struct Checked {
    pub payload: Value,
    pub challenge_id: String,
}

/// Checks an `Authorization: Payment` credential (its base64url part) for
/// `amount` atomic units; `requirements` are the x402 terms of the same price
/// (the payload's `accepted`); `now` is Unix seconds.
pub fn check(
    credential: &str,
    x402: &X402,
    key: &ChallengeKey,
    amount: &str,
    requirements: &Value,
    now: i64,
) -> Result<Checked, Refusal> {
    let malformed = |why: &str| refuse(Problem::MalformedCredential, why);
    let bytes = base64_decode(credential).ok_or_else(|| malformed("not base64url"))?;
    let doc: Value = serde_json::from_slice(&bytes).map_err(|_| malformed("not JSON"))?;
    let echo = doc
        .get("challenge")
        .filter(|c| c.is_object())
        .ok_or_else(|| malformed("no 'challenge' object"))?;
    let proof = doc
        .get("payload")
        .filter(|p| p.is_object())
        .ok_or_else(|| malformed("no 'payload' object"))?;
    let text = |v: &Value, k: &str| {
        v.get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let (id, realm, method, intent) = (
        text(echo, "id"),
        text(echo, "realm"),
        text(echo, "method"),
        text(echo, "intent"),
    );
    if method != METHOD || intent != INTENT {
        return Err(refuse(
            Problem::MethodUnsupported,
            format!("this service takes method \"{METHOD}\", intent \"{INTENT}\" (got \"{method}\", \"{intent}\")"),
        ));
    }
    // The echoed terms, as the client read them from the challenge.
    let request = base64_decode(&text(echo, "request"))
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .ok_or_else(|| malformed("challenge.request is not base64url JSON"))?;
    let echoed = Terms {
        amount: text(&request, "amount"),
        currency: text(&request, "currency"),
        recipient: text(&request, "recipient"),
        chain_id: request
            .pointer("/methodDetails/chainId")
            .and_then(Value::as_u64)
            .unwrap_or(0),
    };
    let expires = text(echo, "expires");
    // The realm is bound when the service names it (a changed one is refused).
    let bound_realm = if x402.realm.is_some() {
        realm.as_str()
    } else {
        ""
    };
    let issued = key.reissue(&id, bound_realm, &echoed, &expires);
    if id.len() <= SALT_LEN || !crate::util::ct_eq(id.as_bytes(), issued.as_bytes()) {
        return Err(refuse(
            Problem::InvalidChallenge,
            "the challenge was not issued by this service, or was changed",
        ));
    }
    if expires_secs(&expires).is_none_or(|e| e <= now) {
        return Err(refuse(
            Problem::PaymentExpired,
            "the challenge has expired: retry without the credential for a fresh one",
        ));
    }
    let terms = Terms::of(x402, amount);
    let same = |a: &str, b: &str| a.eq_ignore_ascii_case(b);
    if echoed.amount != terms.amount
        || !same(&echoed.currency, &terms.currency)
        || !same(&echoed.recipient, &terms.recipient)
        || echoed.chain_id != terms.chain_id
    {
        return Err(refuse(
            Problem::VerificationFailed,
            format!(
                "the challenge is for other terms than this request's ({} of {} to {})",
                terms.amount, terms.currency, terms.recipient
            ),
        ));
    }
    if text(proof, "type") != CREDENTIAL_TYPE {
        return Err(refuse(
            Problem::VerificationFailed,
            "payload.type must be \"authorization\"",
        ));
    }
    let field = |k: &str| {
        let v = text(proof, k);
        if v.is_empty() || v.len() > 140 || !v.bytes().all(|b| b.is_ascii_alphanumeric()) {
            Err(refuse(
                Problem::VerificationFailed,
                format!("payload.{k} missing or malformed"),
            ))
        } else {
            Ok(v)
        }
    };
    let (from, to, value) = (field("from")?, field("to")?, field("value")?);
    let (valid_after, valid_before) = (field("validAfter")?, field("validBefore")?);
    let (nonce, signature) = (field("nonce")?, field("signature")?);
    if !same(&to, &terms.recipient) || value != terms.amount {
        return Err(refuse(
            Problem::VerificationFailed,
            "the authorization does not pay the challenge's amount to its recipient",
        ));
    }
    if !same(&nonce, &challenge_hash(&id, &realm)) {
        return Err(refuse(
            Problem::VerificationFailed,
            "the authorization's nonce is not this challenge's hash",
        ));
    }
    Ok(Checked {
        payload: json!({
            "x402Version": 2,
            "accepted": requirements,
            "payload": {
                "authorization": {
                    "from": from, "to": to, "value": value,
                    "validAfter": valid_after, "validBefore": valid_before, "nonce": nonce,
                },
                "signature": signature,
            },
        }),
        challenge_id: id,
    })
}

/// The `Payment-Receipt` content of a settled charge: `reference` is the
/// transaction (the filter base64url-encodes it into the header).
pub fn receipt(reference: &str, challenge_id: &str, timestamp: &str) -> Value {
    json!({
        "status": "success",
        "method": METHOD,
        "timestamp": timestamp,
        "reference": reference,
        "challengeId": challenge_id,
    })
}

/// Unix seconds of an RFC 3339 UTC time as the challenges write it
/// (`YYYY-MM-DDTHH:MM:SSZ`); `None` for anything else.
fn expires_secs(v: &str) -> Option<i64> {
    let b = v.as_bytes();
    if b.len() != 20 || b.get(19) != Some(&b'Z') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| v.get(r).and_then(|s| s.parse::<i64>().ok());
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    // Days from the civil date (proleptic Gregorian), the inverse of rfc3339().
    let (y, m) = if m <= 2 { (y - 1, m + 9) } else { (y, m - 3) };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let doy = (153 * m + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hh * 3600 + mm * 60 + ss)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::util::base64url;

    fn x402() -> X402 {
        X402 {
            pay_to: "0x00000000000000000000000000000000000000Bb".into(),
            network: "eip155:31337".into(),
            asset: "0x00000000000000000000000000000000000000Aa".into(),
            amount_per_unit: 1000,
            asset_name: "T".into(),
            asset_version: "1".into(),
            asset_decimals: 6,
            realm: Some("api.test".into()),
            challenge_secret: Some("0123456789abcdef0123".into()),
            facilitator: None,
        }
    }

    /// A credential as pympp writes it for `challenge`.
    fn credential(challenge: &Value, edit: impl Fn(&mut Value)) -> String {
        let id = challenge["id"].as_str().unwrap();
        let realm = challenge["realm"].as_str().unwrap();
        let mut doc = json!({
            "challenge": {
                "id": id, "realm": realm, "method": challenge["method"], "intent": challenge["intent"],
                "request": base64url(challenge["request"].to_string().as_bytes()),
                "expires": challenge["expires"],
            },
            "payload": {
                "type": "authorization", "from": "0x00000000000000000000000000000000000000Cc",
                "to": challenge["request"]["recipient"], "value": challenge["request"]["amount"],
                "validAfter": "0", "validBefore": "4102444800",
                "nonce": challenge_hash(id, realm), "signature": "0x00",
            },
            "source": "did:pkh:eip155:31337:0x00000000000000000000000000000000000000Cc",
        });
        edit(&mut doc);
        base64url(doc.to_string().as_bytes())
    }

    #[test]
    fn expiry_times_round_trip() {
        assert_eq!(expires_secs("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(expires_secs("2023-11-14T22:13:20Z"), Some(1_700_000_000));
        assert_eq!(expires_secs("2100-02-28T23:59:59Z"), Some(4_107_542_399));
        assert_eq!(expires_secs("2023-11-14T22:13:20+01:00"), None);
        assert_eq!(expires_secs("2023-13-14T22:13:20Z"), None);
        assert_eq!(expires_secs(""), None);
    }

    #[test]
    fn challenge_hash_is_mppx_s() {
        // keccak256('["id","realm"]'), the nonce pympp and mppx sign.
        assert_eq!(
            challenge_hash("id", "realm"),
            keccak256_hex(br#"["id","realm"]"#)
        );
        assert_eq!(challenge_hash("a", "b").len(), 66);
    }

    #[test]
    fn credentials_are_checked_against_their_challenge() {
        let (x, key) = (x402(), ChallengeKey::new(Some(&x402())));
        let now = 1_700_000_000;
        let expires = "2023-11-14T22:18:20Z";
        let c = challenge(&x, &key, "1000", "data", expires);
        assert_eq!(c["method"], "evm");
        assert_eq!(c["request"]["methodDetails"]["chainId"], 31337);
        assert_eq!(
            c["request"]["methodDetails"]["credentialTypes"],
            json!(["authorization"])
        );
        let twin = challenge(&x, &key, "1000", "data", expires);
        assert_ne!(twin["id"], c["id"], "salted: a payer may pay both");
        let req = json!({"scheme": "exact"});
        let ok = check(&credential(&c, |_| {}), &x, &key, "1000", &req, now).unwrap();
        assert_eq!(ok.challenge_id, c["id"].as_str().unwrap());
        assert_eq!(ok.payload["accepted"], req);
        assert_eq!(ok.payload["payload"]["authorization"]["value"], "1000");
        assert_eq!(ok.payload["payload"]["signature"], "0x00");

        let problem = |cred: String, amount: &str, now: i64| {
            check(&cred, &x, &key, amount, &req, now)
                .unwrap_err()
                .problem
        };
        // Another price than the route's.
        assert_eq!(
            problem(credential(&c, |_| {}), "2000", now),
            Problem::VerificationFailed
        );
        // Expired.
        assert_eq!(
            problem(credential(&c, |_| {}), "1000", now + 301),
            Problem::PaymentExpired
        );
        // A changed echo (cheaper terms), or another service's key.
        let cheaper = credential(&c, |d| {
            let mut r = c["request"].clone();
            r["amount"] = json!("1");
            d["challenge"]["request"] = json!(base64url(r.to_string().as_bytes()));
        });
        assert_eq!(problem(cheaper, "1", now), Problem::InvalidChallenge);
        // Another realm than the one the service named (the nonce signed for it).
        let realm = credential(&c, |d| {
            d["challenge"]["realm"] = json!("elsewhere.test");
            d["payload"]["nonce"] =
                json!(challenge_hash(c["id"].as_str().unwrap(), "elsewhere.test"));
        });
        assert_eq!(problem(realm, "1000", now), Problem::InvalidChallenge);
        let other = ChallengeKey(b"another key of this length".to_vec());
        let foreign = challenge(&x, &other, "1000", "data", expires);
        assert_eq!(
            problem(credential(&foreign, |_| {}), "1000", now),
            Problem::InvalidChallenge
        );
        // A signature for another challenge, to someone else, or not EIP-3009.
        let nonce = credential(&c, |d| {
            d["payload"]["nonce"] = json!(challenge_hash("x", "y"))
        });
        assert_eq!(problem(nonce, "1000", now), Problem::VerificationFailed);
        let to = credential(&c, |d| {
            d["payload"]["to"] = json!("0x00000000000000000000000000000000000000Dd")
        });
        assert_eq!(problem(to, "1000", now), Problem::VerificationFailed);
        let kind = credential(&c, |d| d["payload"]["type"] = json!("hash"));
        assert_eq!(problem(kind, "1000", now), Problem::VerificationFailed);
        let method = credential(&c, |d| d["challenge"]["method"] = json!("tempo"));
        assert_eq!(problem(method, "1000", now), Problem::MethodUnsupported);
        assert_eq!(
            problem("!!".into(), "1000", now),
            Problem::MalformedCredential
        );
        assert_eq!(
            problem(base64url(b"{\"payload\":{}}"), "1000", now),
            Problem::MalformedCredential
        );
    }

    #[test]
    fn receipts_name_the_transaction() {
        let r = receipt("0xabc", "ch", "2026-12-01T00:00:00Z");
        assert_eq!(r["status"], "success");
        assert_eq!(r["method"], "evm");
        assert_eq!(r["reference"], "0xabc");
    }
}
