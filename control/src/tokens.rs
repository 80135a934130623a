//! The `skiff-control token` commands: bootstrap tokens made, listed and
//! deleted through the apiserver, as `kubeadm token` does.

use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client};

use crate::auth::bootstrap;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("{0}")]
    Invalid(String),
    #[error("making a token: {0}")]
    Random(#[from] crate::pki::PkiError),
    #[error("the apiserver: {0}")]
    Api(#[from] kube::Error),
    #[error("the token secret: {0}")]
    Json(#[from] serde_json::Error),
}

/// `24h`, `30m`, `90s`, `2h30m`; `0` means the token never expires.
pub fn parse_ttl(s: &str) -> Result<Option<Duration>, TokenError> {
    let bad = || {
        TokenError::Invalid(format!(
            "--ttl {s:?}: expected a duration such as 24h, 30m or 90s, or 0"
        ))
    };
    if s.trim() == "0" {
        return Ok(None);
    }
    crate::duration::parse(s).map(Some).ok_or_else(bad)
}

/// Creates a token: `id.secret`.
pub async fn create(
    client: Client,
    ttl: Option<Duration>,
    description: &str,
) -> Result<String, TokenError> {
    let (id, secret) = bootstrap::generate()?;
    let obj: Secret = serde_json::from_value(bootstrap::secret(&id, &secret, ttl, description))?;
    Api::<Secret>::namespaced(client, bootstrap::NAMESPACE)
        .create(&PostParams::default(), &obj)
        .await?;
    Ok(format!("{id}.{secret}"))
}

/// One row of `token list`.
pub struct Listed {
    pub id: String,
    pub expires: Option<SystemTime>,
    pub description: String,
}

pub async fn list(client: Client) -> Result<Vec<Listed>, TokenError> {
    let secrets = Api::<Secret>::namespaced(client, bootstrap::NAMESPACE)
        .list(&Default::default())
        .await?;
    let mut out = Vec::new();
    for s in secrets.items {
        if s.type_.as_deref() != Some(bootstrap::SECRET_TYPE) {
            continue;
        }
        let name = s.metadata.name.clone().unwrap_or_default();
        let Some(id) = name.strip_prefix(bootstrap::SECRET_PREFIX) else {
            continue;
        };
        let v = serde_json::to_value(&s)?;
        let description = s
            .data
            .as_ref()
            .and_then(|d| d.get("description"))
            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            .unwrap_or_default();
        out.push(Listed {
            id: id.to_string(),
            expires: bootstrap::expiration(&v),
            description,
        });
    }
    Ok(out)
}

/// Deletes a token given as `id` or `id.secret`.
pub async fn delete(client: Client, token: &str) -> Result<(), TokenError> {
    let id = token.split('.').next().unwrap_or_default();
    if id.len() != 6
        || !id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return Err(TokenError::Invalid(format!(
            "{token:?} is not a token id ([a-z0-9]{{6}}) or token"
        )));
    }
    Api::<Secret>::namespaced(client, bootstrap::NAMESPACE)
        .delete(
            &format!("{}{id}", bootstrap::SECRET_PREFIX),
            &DeleteParams::default(),
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls() {
        assert_eq!(
            parse_ttl("24h").ok().flatten(),
            Some(Duration::from_secs(86_400))
        );
        assert_eq!(
            parse_ttl("2h30m").ok().flatten(),
            Some(Duration::from_secs(9000))
        );
        assert_eq!(parse_ttl("0").ok().flatten(), None);
        for bad in ["", "h", "10", "5d", "-1h"] {
            assert!(parse_ttl(bad).is_err(), "{bad}");
        }
    }
}
