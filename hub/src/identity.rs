//! Customers' identity: JWTs from an OpenID Connect provider, verified with `jsonwebtoken`
//! against the provider's JWKS (fetched from the configured URL, cached, and fetched again when
//! it is older than `jwks_refresh_seconds` or a token names a key the cache lacks: key rotation).
//! The customer is the token's `sub`; nothing a request body says changes who it is.

use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};

/// `[customers]` in the hub config: where customers' tokens come from.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CustomersConfig {
    /// The provider's issuer, exactly as its tokens' `iss` claim says it.
    pub issuer: String,
    /// The audience the tokens must name in `aud` (the app's client id, or an API identifier).
    pub audience: String,
    /// The provider's JSON Web Key Set (`jwks_uri` of its discovery document).
    pub jwks_url: String,
    /// Keys older than this are fetched again (default 3600).
    #[serde(default = "default_refresh")]
    pub jwks_refresh_seconds: u64,
    /// Clock skew allowed on `exp` and `nbf` (default 60).
    #[serde(default = "default_leeway")]
    pub leeway_seconds: u64,
    /// The regions customers may use; `["*"]` (the default) for all this hub owns.
    #[serde(default = "all_regions")]
    pub regions: Vec<String>,
}

fn default_refresh() -> u64 {
    3600
}

fn default_leeway() -> u64 {
    60
}

fn all_regions() -> Vec<String> {
    vec!["*".into()]
}

/// A token naming a key the cache lacks fetches the set again at most this often, so tokens
/// made up with random key ids cannot make the hub hammer the provider.
const UNKNOWN_KEY_REFETCH_MIN: Duration = Duration::from_secs(5);
/// Longest a JWKS fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest JWKS document read.
const JWKS_BYTES_MAX: u64 = 256 * 1024;
/// The signature algorithms taken: asymmetric only (a shared secret is not a provider's key).
const ALGORITHMS: [Algorithm; 8] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::EdDSA,
];

impl CustomersConfig {
    /// What is wrong with this section, for `check-config` and start-up.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.issuer.trim().is_empty() {
            p.push("customers.issuer: the provider's issuer is required".into());
        }
        if self.audience.trim().is_empty() {
            p.push("customers.audience: the audience tokens must name is required".into());
        }
        match reqwest::Url::parse(&self.jwks_url) {
            Ok(u) if matches!(u.scheme(), "https" | "http") => {}
            Ok(u) => p.push(format!("customers.jwks_url: {} is not http(s)", u.scheme())),
            Err(e) => p.push(format!("customers.jwks_url: {e}")),
        }
        if !(1..=7 * 86_400).contains(&self.jwks_refresh_seconds) {
            p.push("customers.jwks_refresh_seconds: 1 to 604800".into());
        }
        if self.leeway_seconds > 600 {
            p.push("customers.leeway_seconds: at most 600".into());
        }
        if self.regions.is_empty() {
            p.push("customers.regions: name at least one region, or \"*\"".into());
        }
        p
    }

    /// Whether customers may use region `r`.
    pub fn serves(&self, r: &str) -> bool {
        self.regions.iter().any(|x| x == "*" || x == r)
    }
}

/// Why a customer token was not taken.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The token is not a valid one of the provider's (answered 401).
    #[error("customer token refused: {0}")]
    Refused(String),
    /// The provider's keys could not be had and none are cached (answered 503).
    #[error("the identity provider's keys are unavailable: {0}")]
    KeysUnavailable(String),
}

/// One verification key of the set.
struct Key {
    kid: Option<String>,
    /// The algorithm the key declares, if it does.
    alg: Option<Algorithm>,
    key: Arc<DecodingKey>,
}

#[derive(Default)]
struct Cache {
    keys: Vec<Key>,
    fetched_at: Option<Instant>,
    tried_at: Option<Instant>,
}

/// The claims the hub reads; `iss`, `aud`, `exp` and `nbf` are checked by `jsonwebtoken`.
#[derive(Deserialize)]
struct Claims {
    sub: String,
}

/// Verifies customers' tokens against the provider's keys.
pub struct Customers {
    config: CustomersConfig,
    client: ureq::Agent,
    cache: std::sync::Mutex<Cache>,
    /// Held while the set is fetched: one fetch at a time.
    fetching: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Customers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Customers")
            .field("issuer", &self.config.issuer)
            .finish_non_exhaustive()
    }
}

impl Customers {
    pub fn new(config: CustomersConfig) -> Result<Self, String> {
        let tls = ureq::tls::TlsConfig::builder()
            .root_certs(ureq::tls::RootCerts::PlatformVerifier)
            .build();
        let client = ureq::Agent::config_builder()
            .timeout_global(Some(FETCH_TIMEOUT))
            .max_redirects(3)
            .tls_config(tls)
            .build()
            .into();
        Ok(Self {
            config,
            client,
            cache: std::sync::Mutex::new(Cache::default()),
            fetching: tokio::sync::Mutex::new(()),
        })
    }

    pub fn config(&self) -> &CustomersConfig {
        &self.config
    }

    /// The customer a token names, once its signature, issuer, audience and lifetime check.
    pub async fn verify(self: &Arc<Self>, token: &str) -> Result<String, TokenError> {
        let refused = |e: &dyn std::fmt::Display| TokenError::Refused(e.to_string());
        let header = jsonwebtoken::decode_header(token).map_err(|e| refused(&e))?;
        if !ALGORITHMS.contains(&header.alg) {
            return Err(TokenError::Refused(format!(
                "algorithm {:?} is not taken (asymmetric signatures only)",
                header.alg
            )));
        }
        let key = self.key_for(header.kid.as_deref(), header.alg).await?;
        let mut v = Validation::new(header.alg);
        v.set_issuer(&[&self.config.issuer]);
        v.set_audience(&[&self.config.audience]);
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        v.leeway = self.config.leeway_seconds;
        v.validate_nbf = true;
        let data = jsonwebtoken::decode::<Claims>(token, &key, &v).map_err(|e| refused(&e))?;
        let sub = data.claims.sub;
        larder_shared::limits::customer_id(&sub).map_err(|e| refused(&e))?;
        Ok(sub)
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The key a token names. A stale set is still used while a fresh one is fetched in the
    /// background; a key the set lacks is fetched for at once, one fetch at a time and at most
    /// every [`UNKNOWN_KEY_REFETCH_MIN`]. No lock is held across a fetch: requests whose key
    /// is cached never wait for the provider.
    async fn key_for(
        self: &Arc<Self>,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Result<Arc<DecodingKey>, TokenError> {
        let no_key = || {
            TokenError::Refused(match kid {
                Some(k) => format!("no key {k:?} in the identity provider's set"),
                None => "no key for the token's algorithm in the provider's set".into(),
            })
        };
        let refresh = Duration::from_secs(self.config.jwks_refresh_seconds);
        let (found, stale) = {
            let c = self.cache();
            let stale = c.fetched_at.is_none_or(|t| t.elapsed() >= refresh);
            (find(&c.keys, kid, alg), stale)
        };
        if let Some(key) = found {
            if stale && self.may_fetch() {
                let this = self.clone();
                tokio::spawn(async move {
                    let _one = this.fetching.lock().await;
                    let _ = this.fetch_into_cache().await;
                });
            }
            return Ok(key);
        }
        let _one = self.fetching.lock().await;
        if let Some(key) = find(&self.cache().keys, kid, alg) {
            // Another request fetched the set while this one waited.
            return Ok(key);
        }
        if !self.may_fetch() {
            return Err(if self.cache().fetched_at.is_none() {
                TokenError::KeysUnavailable("the last fetch failed; trying again shortly".into())
            } else {
                no_key()
            });
        }
        if let Err(e) = self.fetch_into_cache().await
            && self.cache().fetched_at.is_none()
        {
            return Err(TokenError::KeysUnavailable(e));
        }
        find(&self.cache().keys, kid, alg).ok_or_else(no_key)
    }

    /// Whether a fetch may start now (none started within [`UNKNOWN_KEY_REFETCH_MIN`]); if so,
    /// it is marked started.
    fn may_fetch(&self) -> bool {
        let mut c = self.cache();
        let may = c
            .tried_at
            .is_none_or(|t| t.elapsed() >= UNKNOWN_KEY_REFETCH_MIN);
        if may {
            c.tried_at = Some(Instant::now());
        }
        may
    }

    /// Fetches the set and keeps it; on failure the cached keys stay.
    async fn fetch_into_cache(&self) -> Result<(), String> {
        match self.fetch().await {
            Ok(keys) => {
                tracing::info!(keys = keys.len(), url = %self.config.jwks_url, "fetched the identity provider's keys");
                let mut c = self.cache();
                c.keys = keys;
                c.fetched_at = Some(Instant::now());
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not fetch the identity provider's keys; those cached, if any, stay in use");
                Err(e)
            }
        }
    }

    /// The provider's key set, fetched over HTTP(S) (blocking IO, off the async workers).
    async fn fetch(&self) -> Result<Vec<Key>, String> {
        let client = self.client.clone();
        let url = self.config.jwks_url.clone();
        tokio::task::spawn_blocking(move || {
            let what = |e: ureq::Error| format!("{url}: {e}");
            let mut response = client
                .get(&url)
                .header("accept", "application/json")
                .call()
                .map_err(what)?;
            let body = response
                .body_mut()
                .with_config()
                .limit(JWKS_BYTES_MAX)
                .read_to_vec()
                .map_err(what)?;
            parse_jwks(&body)
        })
        .await
        .map_err(|e| format!("the key set's fetch: {e}"))?
    }
}

/// The signing keys of a JWKS document. Keys this hub cannot use (encryption keys, shared
/// secrets, key types `jsonwebtoken` does not know) are left out, not fatal: providers publish
/// them beside the signing keys.
fn parse_jwks(body: &[u8]) -> Result<Vec<Key>, String> {
    #[derive(Deserialize)]
    struct Set {
        keys: Vec<serde_json::Value>,
    }
    let set: Set = serde_json::from_slice(body).map_err(|e| format!("not a JWKS: {e}"))?;
    let keys: Vec<Key> = set
        .keys
        .into_iter()
        .filter_map(|v| serde_json::from_value::<Jwk>(v).ok())
        .filter(|jwk| {
            !matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption))
                && !matches!(jwk.algorithm, AlgorithmParameters::OctetKey(_))
        })
        .filter_map(|jwk| {
            let key = DecodingKey::from_jwk(&jwk).ok()?;
            // A key declaring an algorithm that is not a signature's (RSA-OAEP…) is no
            // signing key: left out, never taken as fit for any algorithm.
            let alg = match jwk.common.key_algorithm {
                Some(a) => Some(
                    serde_json::to_value(a)
                        .ok()
                        .and_then(|v| serde_json::from_value::<Algorithm>(v).ok())?,
                ),
                None => None,
            };
            Some(Key {
                kid: jwk.common.key_id,
                alg,
                key: Arc::new(key),
            })
        })
        .collect();
    if keys.is_empty() {
        return Err("the JWKS holds no signing key this hub can use".into());
    }
    Ok(keys)
}

/// The key a token names by `kid`, or, without one, the only key for its algorithm. A key that
/// declares another algorithm than the token's is never used.
fn find(keys: &[Key], kid: Option<&str>, alg: Algorithm) -> Option<Arc<DecodingKey>> {
    let fits = |k: &&Key| k.alg.is_none_or(|a| a == alg);
    match kid {
        Some(kid) => keys
            .iter()
            .filter(fits)
            .find(|k| k.kid.as_deref() == Some(kid))
            .map(|k| k.key.clone()),
        None => {
            let mut fitting = keys.iter().filter(fits);
            let one = fitting.next()?;
            fitting.next().is_none().then(|| one.key.clone())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encryption_keys_and_shared_secrets_are_left_out_of_a_set() {
        let jwks = br#"{"keys": [
            {"kty": "RSA", "use": "enc", "kid": "enc", "alg": "RSA-OAEP", "n": "sXch", "e": "AQAB"},
            {"kty": "oct", "kid": "secret", "k": "c2VjcmV0"},
            {"kty": "RSA", "kid": "oaep", "alg": "RSA-OAEP", "n": "sXch", "e": "AQAB"},
            {"kty": "OKP", "crv": "Ed25519", "kid": "sig", "alg": "EdDSA", "use": "sig",
             "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
            {"kty": "XYZ", "kid": "unknown"}
        ]}"#;
        let keys = parse_jwks(jwks).expect("a signing key");
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].kid.as_deref(), Some("sig"));
        assert_eq!(keys[0].alg, Some(Algorithm::EdDSA));
        assert!(find(&keys, Some("sig"), Algorithm::EdDSA).is_some());
        // A key that declares EdDSA is never used for another algorithm, nor an unknown kid.
        assert!(find(&keys, Some("sig"), Algorithm::RS256).is_none());
        assert!(find(&keys, Some("other"), Algorithm::EdDSA).is_none());
        assert!(find(&keys, None, Algorithm::EdDSA).is_some());
    }

    #[test]
    fn a_set_without_a_usable_key_is_an_error() {
        assert!(parse_jwks(br#"{"keys": []}"#).is_err());
        assert!(parse_jwks(b"<html>").is_err());
    }

    #[test]
    fn config_problems_name_the_field() {
        let c = CustomersConfig {
            issuer: String::new(),
            audience: "app".into(),
            jwks_url: "ftp://idp/keys".into(),
            jwks_refresh_seconds: 0,
            leeway_seconds: 60,
            regions: vec![],
        };
        let p = c.problems().join("\n");
        for field in [
            "customers.issuer",
            "customers.jwks_url",
            "customers.jwks_refresh_seconds",
            "customers.regions",
        ] {
            assert!(p.contains(field), "{field} in {p}");
        }
    }
}
