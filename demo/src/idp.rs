//! A stand-in OpenID Connect provider for the demo and the tests: signing keys made here
//! (Ed25519 and P-256), their JSON Web Key Set served over HTTP as a provider serves it, and
//! customers' tokens minted with them. Keys rotate as a provider's do: a new key is published,
//! tokens are signed with it, and the old one is retired from the set.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::rand::SystemRandom;
use ring::signature::{self, KeyPair};
use serde_json::{Value, json};

/// The audience the provider's tokens name (the app's client id).
pub const AUDIENCE: &str = "larder-app";

/// A key's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Ed25519,
    P256,
}

struct SigningKey {
    kid: String,
    alg: Algorithm,
    encoding: EncodingKey,
    jwk: Value,
}

/// Published keys, newest last: tokens are signed with the newest.
#[derive(Default)]
struct Keys {
    published: Vec<Arc<SigningKey>>,
    made: usize,
}

/// The stand-in provider, serving its key set until dropped.
pub struct Idp {
    pub issuer: String,
    pub jwks_url: String,
    keys: Arc<Mutex<Keys>>,
    fetches: Arc<AtomicUsize>,
    server: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Idp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idp")
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
    }
}

impl Drop for Idp {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn make_key(kind: KeyKind, n: usize) -> anyhow::Result<SigningKey> {
    let rng = SystemRandom::new();
    let kid = format!("key-{n}");
    let bad = |e: ring::error::Unspecified| anyhow::anyhow!("key: {e}");
    Ok(match kind {
        KeyKind::Ed25519 => {
            let pkcs8 = signature::Ed25519KeyPair::generate_pkcs8(&rng).map_err(bad)?;
            let pair = signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
                .map_err(|e| anyhow::anyhow!("key: {e}"))?;
            SigningKey {
                jwk: json!({"kty": "OKP", "crv": "Ed25519", "use": "sig", "alg": "EdDSA", "kid": kid,
                    "x": B64.encode(pair.public_key().as_ref())}),
                kid,
                alg: Algorithm::EdDSA,
                encoding: EncodingKey::from_ed_der(pkcs8.as_ref()),
            }
        }
        KeyKind::P256 => {
            let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
            let pkcs8 = signature::EcdsaKeyPair::generate_pkcs8(alg, &rng).map_err(bad)?;
            let pair = signature::EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng)
                .map_err(|e| anyhow::anyhow!("key: {e}"))?;
            // An uncompressed point: 0x04, then x and y, 32 bytes each.
            let point = pair.public_key().as_ref();
            SigningKey {
                jwk: json!({"kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
                    "x": B64.encode(&point[1..33]), "y": B64.encode(&point[33..65])}),
                kid,
                alg: Algorithm::ES256,
                encoding: EncodingKey::from_ec_der(pkcs8.as_ref()),
            }
        }
    })
}

impl Idp {
    /// Starts the provider on a loopback port with one key of `kind` published.
    pub async fn start(kind: KeyKind) -> anyhow::Result<Self> {
        let keys = Arc::new(Mutex::new(Keys::default()));
        let fetches = Arc::new(AtomicUsize::new(0));
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let addr = listener.local_addr()?;
        let issuer = format!("http://{addr}/realms/larder");
        let app = axum::Router::new().route(
            "/realms/larder/protocol/openid-connect/certs",
            axum::routing::get({
                let keys = keys.clone();
                let fetches = fetches.clone();
                move || async move {
                    fetches.fetch_add(1, Ordering::SeqCst);
                    let set: Vec<Value> = keys
                        .lock()
                        .map(|k| k.published.iter().map(|k| k.jwk.clone()).collect())
                        .unwrap_or_default();
                    axum::Json(json!({ "keys": set }))
                }
            }),
        );
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let idp = Self {
            jwks_url: format!("{issuer}/protocol/openid-connect/certs"),
            issuer,
            keys,
            fetches,
            server,
        };
        idp.rotate(kind)?;
        Ok(idp)
    }

    /// The hub's `[customers]` section for this provider.
    pub fn customers_config(&self) -> larder_hub::identity::CustomersConfig {
        larder_hub::identity::CustomersConfig {
            issuer: self.issuer.clone(),
            audience: AUDIENCE.into(),
            jwks_url: self.jwks_url.clone(),
            jwks_refresh_seconds: 3600,
            leeway_seconds: 0,
            regions: vec!["*".into()],
        }
    }

    fn lock(&self) -> anyhow::Result<std::sync::MutexGuard<'_, Keys>> {
        self.keys
            .lock()
            .map_err(|_| anyhow::anyhow!("the provider's keys are poisoned"))
    }

    /// Publishes a new key of `kind`; tokens are signed with it from now on. Returns its id.
    pub fn rotate(&self, kind: KeyKind) -> anyhow::Result<String> {
        let mut keys = self.lock()?;
        keys.made += 1;
        let key = make_key(kind, keys.made)?;
        let kid = key.kid.clone();
        keys.published.push(Arc::new(key));
        Ok(kid)
    }

    /// Takes key `kid` out of the published set (tokens it signed stop verifying once a hub
    /// fetches the set again).
    pub fn retire(&self, kid: &str) -> anyhow::Result<()> {
        self.lock()?.published.retain(|k| k.kid != kid);
        Ok(())
    }

    /// How many times the key set was fetched.
    pub fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }

    /// A token for customer `sub`, valid for an hour, signed with the newest key.
    pub fn token(&self, sub: &str) -> anyhow::Result<String> {
        self.token_for(sub, 3600)
    }

    /// A token for customer `sub` valid for `seconds` (negative: expired that long ago).
    pub fn token_for(&self, sub: &str, seconds: i64) -> anyhow::Result<String> {
        let now = jiff::Timestamp::now().as_second();
        self.sign(json!({
            "iss": self.issuer, "aud": AUDIENCE, "sub": sub,
            "iat": now, "exp": now + seconds,
        }))
    }

    /// `claims` signed with the newest published key, its id in the header.
    pub fn sign(&self, claims: Value) -> anyhow::Result<String> {
        let key = self
            .lock()?
            .published
            .last()
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("no key published"))?;
        sign_with(&key, &claims)
    }

    /// `claims` signed with a key of `kind` this provider never published, under a published
    /// key's id: what a forger would send.
    pub fn forge(&self, kind: KeyKind, claims: Value) -> anyhow::Result<String> {
        let mut key = make_key(kind, 0)?;
        if let Some(k) = self.lock()?.published.last() {
            key.kid = k.kid.clone();
        }
        sign_with(&key, &claims)
    }
}

fn sign_with(key: &SigningKey, claims: &Value) -> anyhow::Result<String> {
    let mut header = Header::new(key.alg);
    header.kid = Some(key.kid.clone());
    Ok(jsonwebtoken::encode(&header, claims, &key.encoding)?)
}
