//! ServiceAccount tokens: bound, expiring JWTs (ES256) signed by a key kept
//! in the data directory, as the TokenRequest subresource issues them.
//!
//! A token names its ServiceAccount and, when bound, the Pod or Secret it
//! lives with, each by uid. It is accepted while it is in date, meant for
//! this apiserver (its audience) and everything it names still exists with
//! the same uid: deleting the ServiceAccount or the pod revokes it.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{SA_PREFIX, User};
use crate::pki::{PkiError, write_private};
use crate::resources;
use crate::storage::store::Store;

/// The issuer and default audience, upstream's default for a cluster whose
/// domain is `cluster.local`.
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
pub const DEFAULT_SECONDS: i64 = 3600;
/// The shortest lifetime a TokenRequest may ask for.
pub const MIN_SECONDS: i64 = 600;

/// What a TokenRequest binds its token to.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ref {
    pub name: String,
    pub uid: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct KubernetesClaims {
    pub namespace: String,
    pub serviceaccount: Ref,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<Ref>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<Ref>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<Ref>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub sub: String,
    pub aud: Vec<String>,
    pub exp: i64,
    pub iat: i64,
    pub nbf: i64,
    pub jti: String,
    #[serde(rename = "kubernetes.io")]
    pub kubernetes: KubernetesClaims,
}

pub struct Tokens {
    key: EcdsaKeyPair,
    rng: SystemRandom,
    key_id: String,
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A token's three parts are base64url; a bootstrap or static token is not.
pub fn looks_like_jwt(token: &str) -> bool {
    token.split('.').count() == 3 && token.starts_with("eyJ")
}

impl Tokens {
    /// Loads the signing key from `path` (PKCS#8 PEM), making it on first
    /// start.
    pub fn load_or_create(path: &Path) -> Result<Self, PkiError> {
        let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let rng = SystemRandom::new();
        let pair = match std::fs::read_to_string(path) {
            Ok(text) => rcgen::KeyPair::from_pem(&text)?,
            Err(_) => {
                let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
                write_private(path, pair.serialize_pem().as_bytes())?;
                pair
            }
        };
        let der = pair.serialize_der();
        let key = EcdsaKeyPair::from_pkcs8(alg, &der, &rng)
            .map_err(|e| PkiError::Key(format!("{}: {e}", path.display())))?;
        let digest = ring::digest::digest(&ring::digest::SHA256, key.public_key().as_ref());
        let key_id = URL_SAFE_NO_PAD.encode(&digest.as_ref()[..16]);
        Ok(Self { key, rng, key_id })
    }

    /// A signed token for `claims`.
    pub fn sign(&self, claims: &Claims) -> Result<String, String> {
        let header = serde_json::json!({"alg": "ES256", "kid": self.key_id});
        let signing_input = format!("{}.{}", b64_json(&header), b64_json(claims));
        let sig = self
            .key
            .sign(&self.rng, signing_input.as_bytes())
            .map_err(|e| format!("signing: {e}"))?;
        Ok(format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(sig.as_ref())
        ))
    }

    /// The claims of a token this key signed, if it is in date.
    pub fn verify(&self, token: &str, now: SystemTime) -> Result<Claims, String> {
        let (input, sig) = token.rsplit_once('.').ok_or("malformed token")?;
        let sig = URL_SAFE_NO_PAD
            .decode(sig)
            .map_err(|_| "malformed signature")?;
        signature::UnparsedPublicKey::new(
            &signature::ECDSA_P256_SHA256_FIXED,
            self.key.public_key().as_ref(),
        )
        .verify(input.as_bytes(), &sig)
        .map_err(|_| "invalid signature")?;
        let (header, payload) = input.split_once('.').ok_or("malformed token")?;
        let header: Value = serde_json::from_slice(
            &URL_SAFE_NO_PAD
                .decode(header)
                .map_err(|_| "malformed header")?,
        )
        .map_err(|_| "malformed header")?;
        if header.get("alg").and_then(Value::as_str) != Some("ES256") {
            return Err("unexpected signing algorithm".into());
        }
        let claims: Claims = serde_json::from_slice(
            &URL_SAFE_NO_PAD
                .decode(payload)
                .map_err(|_| "malformed claims")?,
        )
        .map_err(|e| format!("claims: {e}"))?;
        let now = unix(now);
        if claims.exp <= now {
            return Err("the token has expired".into());
        }
        if claims.nbf > now + 60 {
            return Err("the token is not valid yet".into());
        }
        if claims.iss != ISSUER {
            return Err("the token is from another issuer".into());
        }
        if !claims.aud.iter().any(|a| a == ISSUER) {
            return Err("the token is for another audience".into());
        }
        Ok(claims)
    }

    /// Checks a token and that what it names still exists: the user it
    /// authenticates as.
    pub async fn review(&self, store: &Store, token: &str) -> Result<User, String> {
        let claims = self.verify(token, SystemTime::now())?;
        let k = &claims.kubernetes;
        let ns = k.namespace.as_str();
        let live_uid = |plural: &'static str, name: String| async move {
            let r = resources::find("", "v1", plural).ok_or("no such resource")?;
            let item = store
                .get(&r.key(Some(ns), &name))
                .await
                .map_err(|e| format!("reading {plural}: {e}"))?;
            let Some(item) = item else {
                return Ok::<_, String>(None);
            };
            let v: Value = serde_json::from_slice(&item.value).map_err(|e| e.to_string())?;
            let deleting = v.pointer("/metadata/deletionTimestamp").is_some();
            Ok(v.pointer("/metadata/uid")
                .and_then(Value::as_str)
                .filter(|_| !deleting)
                .map(String::from))
        };
        let sa = &k.serviceaccount;
        if live_uid("serviceaccounts", sa.name.clone())
            .await?
            .as_deref()
            != Some(&sa.uid)
        {
            return Err(format!(
                "serviceaccount {ns}/{} has been deleted or replaced",
                sa.name
            ));
        }
        for (plural, bound) in [("pods", &k.pod), ("secrets", &k.secret)] {
            if let Some(b) = bound
                && live_uid(plural, b.name.clone()).await?.as_deref() != Some(&b.uid)
            {
                return Err(format!(
                    "the token is bound to {plural} {ns}/{} which no longer exists",
                    b.name
                ));
            }
        }
        let mut user = service_account_user(ns, &sa.name);
        user.uid = sa.uid.clone();
        Ok(user)
    }

    /// Claims for a new token of `sa` in `ns`.
    pub fn claims(
        ns: &str,
        sa: Ref,
        audiences: Vec<String>,
        lifetime: Duration,
        bound: Bound,
    ) -> Claims {
        let now = unix(SystemTime::now());
        let mut kubernetes = KubernetesClaims {
            namespace: ns.to_string(),
            serviceaccount: sa.clone(),
            ..Default::default()
        };
        match bound {
            Bound::None => {}
            Bound::Pod(r) => kubernetes.pod = Some(r),
            Bound::Secret(r) => kubernetes.secret = Some(r),
        }
        Claims {
            iss: ISSUER.to_string(),
            sub: format!("{SA_PREFIX}{ns}:{}", sa.name),
            aud: if audiences.is_empty() {
                vec![ISSUER.to_string()]
            } else {
                audiences
            },
            exp: now + lifetime.as_secs() as i64,
            iat: now,
            nbf: now,
            jti: crate::pki::random_hex(16).unwrap_or_default(),
            kubernetes,
        }
    }
}

/// What a token is bound to besides its ServiceAccount.
pub enum Bound {
    None,
    Pod(Ref),
    Secret(Ref),
}

/// The user of ServiceAccount `name` in `ns`.
pub fn service_account_user(ns: &str, name: &str) -> User {
    User::authenticated(
        format!("{SA_PREFIX}{ns}:{name}"),
        vec![
            "system:serviceaccounts".to_string(),
            format!("system:serviceaccounts:{ns}"),
        ],
    )
}

/// Namespace and name of a ServiceAccount user name.
pub fn parse_user(name: &str) -> Option<(&str, &str)> {
    let rest = name.strip_prefix(SA_PREFIX)?;
    let (ns, sa) = rest.split_once(':')?;
    (!ns.is_empty() && !sa.is_empty()).then_some((ns, sa))
}

/// A JWT segment: JSON, base64url without padding.
fn b64_json<T: Serialize>(v: &T) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;

    fn tokens() -> (Tokens, TempDir) {
        let dir = TempDir::new("skiff-sa");
        let t = Tokens::load_or_create(&dir.0.join("sa.key")).expect("key");
        (t, dir)
    }

    #[test]
    fn tokens_verify_until_they_expire() {
        let (t, dir) = tokens();
        let sa = Ref {
            name: "default".into(),
            uid: "u-1".into(),
        };
        let c = Tokens::claims("ns1", sa, vec![], Duration::from_secs(600), Bound::None);
        let token = t.sign(&c).expect("sign");
        assert!(looks_like_jwt(&token));
        let got = t.verify(&token, SystemTime::now()).expect("valid");
        assert_eq!(got.sub, "system:serviceaccount:ns1:default");
        let later = SystemTime::now() + Duration::from_secs(601);
        assert_eq!(
            t.verify(&token, later).expect_err("expired"),
            "the token has expired"
        );
        // The same key after a restart; a different key refuses it.
        let again = Tokens::load_or_create(&dir.0.join("sa.key")).expect("reload");
        assert!(again.verify(&token, SystemTime::now()).is_ok());
        let (other, _d) = tokens();
        assert_eq!(
            other
                .verify(&token, SystemTime::now())
                .expect_err("foreign"),
            "invalid signature"
        );
        let forged = format!(
            "{}.{}",
            token.rsplit_once('.').map(|x| x.0).unwrap_or_default(),
            "AAAA"
        );
        assert!(t.verify(&forged, SystemTime::now()).is_err());
        let elsewhere = Tokens::claims(
            "ns1",
            Ref::default(),
            vec!["vault".into()],
            Duration::from_secs(600),
            Bound::None,
        );
        assert_eq!(
            t.verify(&t.sign(&elsewhere).expect("sign"), SystemTime::now())
                .expect_err("audience"),
            "the token is for another audience"
        );
    }

    #[test]
    fn service_account_user_names() {
        let u = service_account_user("ns1", "builder");
        assert_eq!(u.name, "system:serviceaccount:ns1:builder");
        assert!(u.in_group("system:serviceaccounts:ns1"));
        assert_eq!(parse_user(&u.name), Some(("ns1", "builder")));
        assert_eq!(parse_user("system:serviceaccount:x"), None);
    }
}
