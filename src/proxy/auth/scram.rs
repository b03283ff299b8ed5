//! SCRAM-SHA-256 (RFC 5802, RFC 7677) as PostgreSQL speaks it, at both ends, from a stored
//! secret instead of a password — what lets the proxy authenticate a client itself and then
//! log in to the server as that client (pgbouncer's "SCRAM pass-through"):
//!
//! - [`ServerExchange`]: the proxy as the client's server. It checks the client's proof
//!   against the secret's StoredKey, and the proof reveals the ClientKey (proof XOR
//!   signature): what a client needs, with the StoredKey and ServerKey, to log in — never the
//!   password.
//! - [`ClientExchange`]: the proxy as the server's client, with those keys. The server must
//!   hold the same secret (same salt and iteration count): the proxy reads it from the server.
//!
//! Channel binding (`-PLUS`, `tls-server-end-point`) is per leg: each leg binds to the TLS
//! connection it runs on, the proxy's certificate towards the client, the server's towards
//! the server. No I/O here: messages in, messages out.

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub const MECHANISM: &str = "SCRAM-SHA-256";
pub const MECHANISM_PLUS: &str = "SCRAM-SHA-256-PLUS";
const CHANNEL_BINDING_TYPE: &str = "tls-server-end-point";
/// Random bytes in a nonce (PostgreSQL's own `SCRAM_RAW_NONCE_LEN`).
const RAW_NONCE_LEN: usize = 18;

/// Why an exchange failed. The messages are PostgreSQL's where it has one.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScramError {
    #[error("malformed SCRAM message ({0})")]
    Malformed(&'static str),
    #[error("SCRAM channel binding negotiation error ({0})")]
    ChannelBinding(&'static str),
    #[error("SCRAM channel binding check failed")]
    ChannelBindingMismatch,
    #[error("SCRAM nonce mismatch")]
    Nonce,
    #[error("wrong password")]
    Proof,
    #[error(
        "the server's SCRAM salt or iteration count is not the secret's (the password changed since cutover read it?)"
    )]
    OtherSecret,
    #[error("the server's SCRAM signature is wrong: it is not the server the secret is from")]
    ServerSignature,
    #[error("the server refused the SCRAM exchange: {0}")]
    ServerError(String),
}

/// A SCRAM-SHA-256 secret as PostgreSQL stores it (`pg_authid.rolpassword`):
/// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramSecret {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl std::fmt::Debug for ScramSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScramSecret(..)")
    }
}

impl ScramSecret {
    pub fn parse(text: &str) -> Option<Self> {
        let rest = text.strip_prefix("SCRAM-SHA-256$")?;
        let (params, keys) = rest.split_once('$')?;
        let (iterations, salt) = params.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        Some(Self {
            iterations: iterations.parse().ok().filter(|&i| i > 0)?,
            salt: B64.decode(salt).ok()?,
            stored_key: B64.decode(stored).ok()?.try_into().ok()?,
            server_key: B64.decode(server).ok()?.try_into().ok()?,
        })
    }

    /// A secret for a password, with a fresh random salt (SASLprep applied as PostgreSQL does).
    pub fn for_password(password: &str) -> Self {
        let text = postgres_protocol::password::scram_sha_256(password.as_bytes());
        // postgres-protocol writes exactly the format parse() reads.
        Self::parse(&text).expect("postgres-protocol makes well-formed SCRAM secrets")
    }
}

/// The keys a client logs in with, learnt from a client's proof.
#[derive(Clone)]
pub struct ClientKeys {
    pub client_key: [u8; 32],
    pub secret: ScramSecret,
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes keys of any size");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

fn xor(a: &[u8; 32], b: &[u8; 32]) -> [u8; 32] {
    std::array::from_fn(|i| a[i] ^ b[i])
}

fn nonce() -> String {
    B64.encode(rand::random::<[u8; RAW_NONCE_LEN]>())
}

/// The channel-binding part of a gs2 header and what it binds.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Gs2 {
    /// `n`: the client does not support channel binding.
    No,
    /// `y`: the client supports it but thinks the server does not.
    Yes,
    /// `p=tls-server-end-point`.
    Bound,
}

/// Splits a client-first-message into its gs2 flag, the header as sent, and the bare part.
fn split_client_first(message: &str) -> Result<(Gs2, &str, &str), ScramError> {
    let (flag, rest) = message
        .split_once(',')
        .ok_or(ScramError::Malformed("no gs2 header"))?;
    let gs2 = match flag {
        "n" => Gs2::No,
        "y" => Gs2::Yes,
        p if p.strip_prefix("p=") == Some(CHANNEL_BINDING_TYPE) => Gs2::Bound,
        p if p.starts_with("p=") => {
            return Err(ScramError::ChannelBinding(
                "unsupported channel binding type",
            ));
        }
        _ => return Err(ScramError::Malformed("unexpected gs2 flag")),
    };
    let (authzid, bare) = rest
        .split_once(',')
        .ok_or(ScramError::Malformed("no authzid"))?;
    if !authzid.is_empty() {
        return Err(ScramError::Malformed("authzid is not supported"));
    }
    let header_len = flag.len() + 1 + authzid.len() + 1;
    Ok((gs2, &message[..header_len], bare))
}

/// The value of attribute `name` (`r=`, `s=`…) in a comma-separated SCRAM message.
fn attribute(message: &str, name: char) -> Option<&str> {
    message.split(',').find_map(|part| {
        let mut chars = part.chars();
        (chars.next() == Some(name) && chars.next() == Some('=')).then(|| &part[2..])
    })
}

/// The proxy as the client's server.
pub struct ServerExchange {
    secret: ScramSecret,
    gs2_header: String,
    /// The TLS binding the client must have bound to (only with `p=`).
    binding: Vec<u8>,
    client_first_bare: String,
    server_first: String,
    nonce: String,
}

impl ServerExchange {
    /// The mechanisms to offer: `-PLUS` first when this leg runs on TLS with a certificate
    /// whose end-point hash is known.
    pub fn mechanisms(binding: Option<&[u8]>) -> Vec<&'static str> {
        match binding {
            Some(_) => vec![MECHANISM_PLUS, MECHANISM],
            None => vec![MECHANISM],
        }
    }

    /// Takes the client's SASLInitialResponse (`mechanism`, client-first-message) and
    /// returns the exchange and the server-first-message. `binding`: this leg's
    /// `tls-server-end-point` data, when `-PLUS` was offered.
    pub fn start(
        secret: ScramSecret,
        mechanism: &str,
        client_first: &[u8],
        binding: Option<&[u8]>,
    ) -> Result<(Self, String), ScramError> {
        let message =
            std::str::from_utf8(client_first).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (gs2, header, bare) = split_client_first(message)?;
        match (mechanism, &gs2, binding) {
            (MECHANISM_PLUS, Gs2::Bound, Some(_)) => {}
            (MECHANISM_PLUS, _, _) => {
                return Err(ScramError::ChannelBinding(
                    "-PLUS chosen without binding, or not offered",
                ));
            }
            (MECHANISM, Gs2::Bound, _) => {
                return Err(ScramError::ChannelBinding(
                    "binding asked for without choosing -PLUS",
                ));
            }
            // The client can bind, and thinks this server cannot, but it was offered: a
            // downgrade (PostgreSQL refuses it the same way).
            (MECHANISM, Gs2::Yes, Some(_)) => {
                return Err(ScramError::ChannelBinding(
                    "the client supports channel binding but thinks the server does not",
                ));
            }
            (MECHANISM, _, _) => {}
            _ => return Err(ScramError::Malformed("unknown mechanism")),
        }
        let client_nonce = attribute(bare, 'r').ok_or(ScramError::Malformed("no client nonce"))?;
        if client_nonce.is_empty() || bare.starts_with("m=") {
            return Err(ScramError::Malformed("bad client-first-message"));
        }
        let nonce = format!("{client_nonce}{}", nonce());
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&secret.salt),
            secret.iterations
        );
        let exchange = Self {
            binding: match gs2 {
                Gs2::Bound => binding.unwrap_or_default().to_vec(),
                _ => Vec::new(),
            },
            secret,
            gs2_header: header.to_owned(),
            client_first_bare: bare.to_owned(),
            server_first: server_first.clone(),
            nonce,
        };
        Ok((exchange, server_first))
    }

    /// Checks the client-final-message; returns the server-final-message and the keys the
    /// client's proof revealed.
    pub fn finish(self, client_final: &[u8]) -> Result<(String, ClientKeys), ScramError> {
        let message =
            std::str::from_utf8(client_final).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (without_proof, proof) = message
            .rsplit_once(",p=")
            .ok_or(ScramError::Malformed("no proof"))?;
        let binding = attribute(without_proof, 'c')
            .and_then(|c| B64.decode(c).ok())
            .ok_or(ScramError::Malformed("no channel binding attribute"))?;
        let expected = [self.gs2_header.as_bytes(), &self.binding].concat();
        if binding != expected {
            return Err(ScramError::ChannelBindingMismatch);
        }
        if attribute(without_proof, 'r') != Some(self.nonce.as_str()) {
            return Err(ScramError::Nonce);
        }
        let proof: [u8; 32] = B64
            .decode(proof)
            .ok()
            .and_then(|p| p.try_into().ok())
            .ok_or(ScramError::Malformed("bad proof"))?;
        let auth_message = format!(
            "{},{},{without_proof}",
            self.client_first_bare, self.server_first
        );
        let signature = hmac(&self.secret.stored_key, &[auth_message.as_bytes()]);
        let client_key = xor(&proof, &signature);
        let stored: [u8; 32] = Sha256::digest(client_key).into();
        if !bool::from(stored.ct_eq(&self.secret.stored_key)) {
            return Err(ScramError::Proof);
        }
        let server_signature = hmac(&self.secret.server_key, &[auth_message.as_bytes()]);
        Ok((
            format!("v={}", B64.encode(server_signature)),
            ClientKeys {
                client_key,
                secret: self.secret,
            },
        ))
    }
}

/// The proxy as the server's client, logging in with keys learnt from the client.
pub struct ClientExchange {
    keys: ClientKeys,
    gs2_header: &'static str,
    binding: Vec<u8>,
    client_first_bare: String,
    nonce: String,
    server_signature: Option<[u8; 32]>,
}

impl ClientExchange {
    /// Chooses a mechanism from the server's list: `-PLUS` when offered and this leg's
    /// binding is known; otherwise plain SCRAM saying "no binding" (`n`), which a server on
    /// TLS accepts (unlike `y`). Returns the exchange, the mechanism and the
    /// client-first-message; `None` when the server offers no SCRAM-SHA-256.
    pub fn start(
        keys: ClientKeys,
        offered: &[&str],
        binding: Option<Vec<u8>>,
    ) -> Option<(Self, &'static str, String)> {
        let (mechanism, gs2_header, binding) = match binding {
            Some(b) if offered.contains(&MECHANISM_PLUS) => {
                (MECHANISM_PLUS, "p=tls-server-end-point,,", b)
            }
            _ if offered.contains(&MECHANISM) => (MECHANISM, "n,,", Vec::new()),
            _ => return None,
        };
        let nonce = nonce();
        let client_first_bare = format!("n=,r={nonce}");
        let message = format!("{gs2_header}{client_first_bare}");
        Some((
            Self {
                keys,
                gs2_header,
                binding,
                client_first_bare,
                nonce,
                server_signature: None,
            },
            mechanism,
            message,
        ))
    }

    /// Takes the server-first-message; returns the client-final-message.
    pub fn respond(&mut self, server_first: &[u8]) -> Result<String, ScramError> {
        let message =
            std::str::from_utf8(server_first).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let nonce = attribute(message, 'r').ok_or(ScramError::Malformed("no nonce"))?;
        if !nonce.starts_with(&self.nonce) || nonce.len() == self.nonce.len() {
            return Err(ScramError::Nonce);
        }
        let salt = attribute(message, 's')
            .and_then(|s| B64.decode(s).ok())
            .ok_or(ScramError::Malformed("no salt"))?;
        let iterations: u32 = attribute(message, 'i')
            .and_then(|i| i.parse().ok())
            .ok_or(ScramError::Malformed("no iteration count"))?;
        let secret = &self.keys.secret;
        if salt != secret.salt || iterations != secret.iterations {
            return Err(ScramError::OtherSecret);
        }
        let binding = B64.encode([self.gs2_header.as_bytes(), &self.binding].concat());
        let without_proof = format!("c={binding},r={nonce}");
        let auth_message = format!("{},{message},{without_proof}", self.client_first_bare);
        let signature = hmac(&secret.stored_key, &[auth_message.as_bytes()]);
        let proof = xor(&self.keys.client_key, &signature);
        self.server_signature = Some(hmac(&secret.server_key, &[auth_message.as_bytes()]));
        Ok(format!("{without_proof},p={}", B64.encode(proof)))
    }

    /// Checks the server-final-message: the server proves it holds the same secret.
    pub fn finish(&self, server_final: &[u8]) -> Result<(), ScramError> {
        let message =
            std::str::from_utf8(server_final).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        if let Some(error) = attribute(message, 'e') {
            return Err(ScramError::ServerError(error.to_owned()));
        }
        let signature = attribute(message, 'v')
            .and_then(|v| B64.decode(v).ok())
            .ok_or(ScramError::Malformed("no server signature"))?;
        match self.server_signature {
            Some(expected) if bool::from(signature.as_slice().ct_eq(&expected)) => Ok(()),
            _ => Err(ScramError::ServerSignature),
        }
    }
}

#[cfg(test)]
mod tests {
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    use super::*;

    /// The proxy as server, a real SCRAM client (postgres-protocol's, as tokio-postgres
    /// uses) with the password: accepted with the right one, refused with a wrong one; the
    /// keys it reveals log in to a second server that holds the same secret.
    #[test]
    fn a_client_proof_yields_keys_that_log_in_where_the_secret_is_the_same() {
        let secret = ScramSecret::for_password("s3cret");
        for (password, binding) in [
            ("s3cret", None),
            ("s3cret", Some(vec![7u8; 32])),
            ("wrong", None),
        ] {
            let client_binding = match &binding {
                Some(b) => ChannelBinding::tls_server_end_point(b.clone()),
                None => ChannelBinding::unsupported(),
            };
            let mechanism = if binding.is_some() {
                MECHANISM_PLUS
            } else {
                MECHANISM
            };
            let mut client = ScramSha256::new(password.as_bytes(), client_binding);
            let (server, first) = ServerExchange::start(
                secret.clone(),
                mechanism,
                client.message(),
                binding.as_deref(),
            )
            .unwrap();
            client.update(first.as_bytes()).unwrap();
            let outcome = server.finish(client.message());
            if password != "s3cret" {
                assert_eq!(outcome.err(), Some(ScramError::Proof));
                continue;
            }
            let (last, keys) = outcome.unwrap();
            client.finish(last.as_bytes()).unwrap();

            // Upstream: a second server exchange with the same secret.
            let upstream_binding = Some(vec![9u8; 48]);
            let offered = [MECHANISM_PLUS, MECHANISM];
            let (mut proxy, mechanism, first) =
                ClientExchange::start(keys, &offered, upstream_binding.clone()).unwrap();
            assert_eq!(mechanism, MECHANISM_PLUS);
            let (server, server_first) = ServerExchange::start(
                secret.clone(),
                mechanism,
                first.as_bytes(),
                upstream_binding.as_deref(),
            )
            .unwrap();
            let last = proxy.respond(server_first.as_bytes()).unwrap();
            let (server_final, _) = server.finish(last.as_bytes()).unwrap();
            proxy.finish(server_final.as_bytes()).unwrap();
            assert_eq!(
                proxy.finish(b"v=AAAA"),
                Err(ScramError::ServerSignature),
                "a forged server signature is caught"
            );
        }
    }

    #[test]
    fn downgrades_and_mismatched_bindings_are_refused() {
        let secret = ScramSecret::for_password("pw");
        let offered = Some(&[1u8; 32][..]);
        // `y` while -PLUS was offered.
        let mut client = ScramSha256::new(b"pw", ChannelBinding::unrequested());
        assert!(matches!(
            ServerExchange::start(secret.clone(), MECHANISM, client.message(), offered),
            Err(ScramError::ChannelBinding(_))
        ));
        // `y` where nothing was offered: fine.
        assert!(ServerExchange::start(secret.clone(), MECHANISM, client.message(), None).is_ok());
        // Bound to another certificate.
        client = ScramSha256::new(b"pw", ChannelBinding::tls_server_end_point(vec![2u8; 32]));
        let (server, first) =
            ServerExchange::start(secret.clone(), MECHANISM_PLUS, client.message(), offered)
                .unwrap();
        client.update(first.as_bytes()).unwrap();
        assert_eq!(
            server.finish(client.message()).err(),
            Some(ScramError::ChannelBindingMismatch)
        );
        // Another salt upstream.
        let keys = ClientKeys {
            client_key: [0; 32],
            secret: secret.clone(),
        };
        let (mut proxy, _, _) = ClientExchange::start(keys, &[MECHANISM], None).unwrap();
        let other = ScramSecret::for_password("pw");
        let nonce = proxy.nonce.clone();
        let first = format!("r={nonce}xyz,s={},i=4096", B64.encode(&other.salt));
        assert_eq!(
            proxy.respond(first.as_bytes()),
            Err(ScramError::OtherSecret)
        );
    }

    #[test]
    fn secrets_parse_as_postgres_stores_them() {
        let secret = ScramSecret::for_password("x");
        assert_eq!(secret.iterations, 4096);
        assert_eq!(secret.salt.len(), 16);
        for bad in [
            "",
            "md5abc",
            "SCRAM-SHA-256$0:AAAA$AAAA:AAAA",
            "SCRAM-SHA-256$4096:AAAA$AAAA",
            "SCRAM-SHA-256$4096:!!$AAAA:AAAA",
        ] {
            assert_eq!(ScramSecret::parse(bad), None, "{bad}");
        }
        assert_eq!(format!("{secret:?}"), "ScramSecret(..)");
    }
}
