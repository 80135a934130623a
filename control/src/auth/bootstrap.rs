//! Bootstrap tokens, as kubeadm makes them: `abcdef.0123456789abcdef`, kept
//! as a Secret `bootstrap-token-<id>` in `kube-system` with an expiry. A
//! joining node presents one to ask for its own credential; the token's
//! user is `system:bootstrap:<id>` in the group `system:bootstrappers`.

use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};

use super::{BOOTSTRAPPERS, User};

pub const NAMESPACE: &str = "kube-system";
pub const SECRET_PREFIX: &str = "bootstrap-token-";
pub const SECRET_TYPE: &str = "bootstrap.kubernetes.io/token";
const ID_LEN: usize = 6;
const SECRET_LEN: usize = 16;

fn token_chars(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// The id and secret of a token in bootstrap form, else None.
pub fn parse(token: &str) -> Option<(&str, &str)> {
    let (id, secret) = token.split_once('.')?;
    (token_chars(id, ID_LEN) && token_chars(secret, SECRET_LEN)).then_some((id, secret))
}

/// A new random token: (id, secret).
pub fn generate() -> Result<(String, String), crate::pki::PkiError> {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut buf = [0u8; ID_LEN + SECRET_LEN];
    let mut out = String::with_capacity(buf.len());
    // Rejection sampling keeps every character equally likely.
    while out.len() < buf.len() {
        getrandom::fill(&mut buf).map_err(|e| crate::pki::PkiError::Random(e.to_string()))?;
        for b in buf {
            if (b as usize) < 252 && out.len() < ID_LEN + SECRET_LEN {
                out.push(ALPHABET[b as usize % ALPHABET.len()] as char);
            }
        }
    }
    let (id, secret) = out.split_at(ID_LEN);
    Ok((id.to_string(), secret.to_string()))
}

/// The Secret that holds a token; `ttl` None means it never expires.
pub fn secret(id: &str, secret: &str, ttl: Option<Duration>, description: &str) -> Value {
    let b64 = |s: &str| STANDARD.encode(s.as_bytes());
    let mut data = json!({
        "token-id": b64(id),
        "token-secret": b64(secret),
        "usage-bootstrap-authentication": b64("true"),
        "usage-bootstrap-signing": b64("true"),
    });
    if let Some(ttl) = ttl {
        let at = jiff::Timestamp::now()
            .checked_add(jiff::SignedDuration::try_from(ttl).unwrap_or(jiff::SignedDuration::MAX))
            .unwrap_or(jiff::Timestamp::MAX);
        data["expiration"] = json!(b64(&at.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()));
    }
    if !description.is_empty() {
        data["description"] = json!(b64(description));
    }
    json!({
        "apiVersion": "v1", "kind": "Secret", "type": SECRET_TYPE,
        "metadata": {"name": format!("{SECRET_PREFIX}{id}"), "namespace": NAMESPACE},
        "data": data,
    })
}

fn field(secret: &Value, key: &str) -> Option<String> {
    let raw = secret.pointer(&format!("/data/{key}"))?.as_str()?;
    let bytes = STANDARD.decode(raw).ok()?;
    String::from_utf8(bytes).ok()
}

/// When the token in `secret` expires, if it does.
pub fn expiration(secret: &Value) -> Option<SystemTime> {
    let at: jiff::Timestamp = field(secret, "expiration")?.parse().ok()?;
    Some(SystemTime::from(at))
}

/// Equal, in time that does not depend on where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The user a token authenticates as, checked against its Secret.
pub fn check(
    secret: &Value,
    id: &str,
    token_secret: &str,
    now: SystemTime,
) -> Result<User, String> {
    if secret.get("type").and_then(Value::as_str) != Some(SECRET_TYPE) {
        return Err("the token's secret has the wrong type".into());
    }
    if field(secret, "token-id").as_deref() != Some(id) {
        return Err("the token id does not match its secret".into());
    }
    let stored = field(secret, "token-secret").unwrap_or_default();
    if !same(stored.as_bytes(), token_secret.as_bytes()) {
        return Err("wrong token secret".into());
    }
    if field(secret, "usage-bootstrap-authentication").as_deref() != Some("true") {
        return Err("the token is not for authentication".into());
    }
    if expiration(secret).is_some_and(|at| at <= now) {
        return Err("the token has expired".into());
    }
    let mut groups = vec![BOOTSTRAPPERS.to_string()];
    if let Some(extra) = field(secret, "auth-extra-groups") {
        groups.extend(
            extra
                .split(',')
                .map(str::trim)
                .filter(|g| g.starts_with("system:bootstrappers:"))
                .map(String::from),
        );
    }
    Ok(User::authenticated(
        format!("system:bootstrap:{id}"),
        groups,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_through_their_secret() {
        let (id, sec) = generate().expect("token");
        let token = format!("{id}.{sec}");
        assert_eq!(parse(&token), Some((id.as_str(), sec.as_str())));
        let s = secret(&id, &sec, Some(Duration::from_secs(3600)), "join");
        assert_eq!(s["metadata"]["name"], format!("bootstrap-token-{id}"));
        let user = check(&s, &id, &sec, SystemTime::now()).expect("valid");
        assert_eq!(user.name, format!("system:bootstrap:{id}"));
        assert!(user.in_group(BOOTSTRAPPERS) && user.in_group(super::super::AUTHENTICATED));
        assert!(check(&s, &id, "0000000000000000", SystemTime::now()).is_err());
        let later = SystemTime::now() + Duration::from_secs(7200);
        assert_eq!(
            check(&s, &id, &sec, later).expect_err("expired"),
            "the token has expired"
        );
        let forever = secret(&id, &sec, None, "");
        assert!(check(&forever, &id, &sec, later).is_ok());
    }

    #[test]
    fn only_the_bootstrap_form_parses() {
        assert!(parse("abcdef.0123456789abcdef").is_some());
        assert!(parse("ABCDEF.0123456789abcdef").is_none());
        assert!(parse("abcdef0123456789abcdef").is_none());
        assert!(parse("abcde.0123456789abcdefg").is_none());
    }
}
