//! The MQTT connect token: a device proves it holds its key when it connects, with a fresh
//! signed token as the MQTT password (`{at_ms}.{nonce hex}.{signature hex}`), signed over the
//! device id, time and nonce under its own domain.

use crate::ids::DeviceId;
use crate::keys::{PublicKey, SIGNATURE_LEN, SecretKey, Signature};

const CONNECT_DOMAIN: &[u8] = b"larder/connect/v1\0";
const BROKER_PASSWORD_DOMAIN: &[u8] = b"larder/broker-password/v1\0";

/// The password an external broker (Mosquitto, EMQX) knows `user` by: derived from the hub's
/// key (its deterministic Ed25519 signature over the user name, cut to 24 bytes), so the hub
/// can derive every password again, no one without its key can, and nothing is stored. The
/// embedded broker does not use these: it checks connect tokens.
pub fn broker_password(hub_key: &SecretKey, user: &str) -> String {
    let sig = hub_key.sign(BROKER_PASSWORD_DOMAIN, user.as_bytes());
    hex::encode(&sig.0[..24])
}

/// Why a connect token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    #[error("token is malformed")]
    Malformed,
    #[error("token is {age_ms} ms from now, over the {max_ms} ms allowed")]
    Stale { age_ms: i64, max_ms: i64 },
    #[error("token signature does not verify")]
    BadSignature,
}

fn message(device: &DeviceId, at_ms: i64, nonce: &[u8; 16]) -> Vec<u8> {
    let mut m = Vec::with_capacity(device.as_str().len() + 1 + 8 + 16);
    m.extend_from_slice(device.as_str().as_bytes());
    m.push(0);
    m.extend_from_slice(&at_ms.to_be_bytes());
    m.extend_from_slice(nonce);
    m
}

/// The session a connect token opens: its time and nonce (see [`crate::presence`]); `None` for
/// a token that does not parse (its signature is not checked here).
pub fn token_session(token: &str) -> Option<crate::presence::Session> {
    let mut parts = token.split('.');
    let at_ms: i64 = parts.next()?.parse().ok()?;
    let nonce: [u8; 16] = hex::decode(parts.next()?).ok()?.try_into().ok()?;
    Some(crate::presence::Session { at_ms, nonce })
}

/// A fresh token for `device` at `now_ms` with a random `nonce`.
pub fn connect_token(key: &SecretKey, device: &DeviceId, now_ms: i64, nonce: [u8; 16]) -> String {
    let sig = key.sign(CONNECT_DOMAIN, &message(device, now_ms, &nonce));
    format!("{now_ms}.{}.{}", hex::encode(nonce), hex::encode(sig.0))
}

/// Checks a token: signed by `key` for `device`, within `max_age_ms` of `now_ms`.
/// Returns the nonce so the caller can refuse a replay.
pub fn verify_connect_token(
    token: &str,
    key: &PublicKey,
    device: &DeviceId,
    now_ms: i64,
    max_age_ms: i64,
) -> Result<[u8; 16], TokenError> {
    let mut parts = token.split('.');
    let (Some(at), Some(nonce), Some(sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed);
    };
    let at_ms: i64 = at.parse().map_err(|_| TokenError::Malformed)?;
    let nonce: [u8; 16] = hex::decode(nonce)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or(TokenError::Malformed)?;
    let sig: [u8; SIGNATURE_LEN] = hex::decode(sig)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or(TokenError::Malformed)?;
    // Any `at` parses, the extremes included: the distance cannot overflow.
    let age_ms = i64::try_from(now_ms.abs_diff(at_ms)).unwrap_or(i64::MAX);
    if age_ms > max_age_ms {
        return Err(TokenError::Stale {
            age_ms,
            max_ms: max_age_ms,
        });
    }
    key.verify(
        CONNECT_DOMAIN,
        &message(device, at_ms, &nonce),
        &Signature(sig),
    )
    .map_err(|_| TokenError::BadSignature)?;
    Ok(nonce)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_passwords_are_per_user_and_per_hub_key() {
        let hub = SecretKey::from_seed([1; 32]);
        let other = SecretKey::from_seed([2; 32]);
        let a = broker_password(&hub, "pos-1");
        assert_eq!(a, broker_password(&hub, "pos-1"), "derived again alike");
        assert_eq!(a.len(), 48);
        assert_ne!(a, broker_password(&hub, "pos-2"));
        assert_ne!(a, broker_password(&other, "pos-1"));
    }

    #[test]
    fn extreme_timestamps_are_stale_not_a_panic() {
        let key = SecretKey::from_seed([3; 32]);
        let device = DeviceId::new("pos-1").expect("id");
        for at in [i64::MIN, i64::MAX] {
            let token = connect_token(&key, &device, at, [9; 16]);
            for now in [i64::MIN, 0, 1_800_000_000_000, i64::MAX] {
                let checked = verify_connect_token(&token, &key.public(), &device, now, 300_000);
                if now == at {
                    assert!(checked.is_ok());
                } else {
                    assert!(
                        matches!(checked, Err(TokenError::Stale { .. })),
                        "{at} at {now}"
                    );
                }
            }
        }
    }

    #[test]
    fn tokens_by_table() {
        let key = SecretKey::from_seed([9; 32]);
        let other = SecretKey::from_seed([8; 32]);
        let dev = DeviceId::new("pos-1").expect("id");
        let token = connect_token(&key, &dev, 1_000_000, [1; 16]);
        let check = |t: &str, k: &SecretKey, d: &str, now: i64| {
            verify_connect_token(t, &k.public(), &DeviceId::new(d).expect("id"), now, 60_000)
        };
        assert_eq!(check(&token, &key, "pos-1", 1_000_000), Ok([1; 16]));
        assert_eq!(check(&token, &key, "pos-1", 1_030_000), Ok([1; 16]));
        assert!(matches!(
            check(&token, &key, "pos-1", 1_070_000),
            Err(TokenError::Stale { .. })
        ));
        assert_eq!(
            check(&token, &other, "pos-1", 1_000_000),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            check(&token, &key, "pos-2", 1_000_000),
            Err(TokenError::BadSignature)
        );
        assert_eq!(check("1.2", &key, "pos-1", 1), Err(TokenError::Malformed));
        assert_eq!(
            check("x.00.00", &key, "pos-1", 1),
            Err(TokenError::Malformed)
        );
    }
}
