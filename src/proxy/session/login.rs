//! A session's login: from the StartupMessage to the server's AuthenticationOk, within
//! `authentication_timeout`, before the relay starts.
//!
//! Two ways, chosen per user:
//!
//! - **relayed** (no secret for the user, the default): the server authenticates the client,
//!   the proxy passes the messages, one at a time, both ways. It takes the `-PLUS`
//!   mechanisms out of the server's SASL list, since channel binding cannot cross a proxy
//!   that terminates TLS. With TLS on both legs a SCRAM client that could bind then answers
//!   "y" and the server refuses it as a downgrade: the client gets that refusal with the
//!   cause and the way out (an auth source).
//! - **by the proxy** (the user has a secret in `auth_file` / `auth_query`): the proxy is the
//!   client's server (SCRAM, with `-PLUS` bound to its own certificate on TLS; or md5), then
//!   the server's client, with the keys the client's SCRAM proof revealed (bound to the
//!   server's certificate on TLS) or the md5 secret. The client is told AuthenticationOk
//!   only once the server said it.
//!
//! Frames are read one at a time, exactly: nothing read here belongs to the relay. The login
//! slot becomes a session slot at AuthenticationOk (see [`super::slots`]).

use std::io;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_postgres::error::SqlState;

use super::{Shared, refuse, slots::Slot};
use crate::proxy::io::Duplex;
use crate::{
    metrics::Login,
    proxy::auth::{
        ClientKeys, Secret, md5_inner, md5_response,
        scram::{self, ClientExchange, ServerExchange},
    },
    proxy::upstream::{self, UpstreamStream},
    wire::{
        Startup, frame,
        messages::{self, AUTH_OK, AUTH_SASL, backend, error_field_list},
    },
};

const AUTH_CLEARTEXT: u32 = 3;
const AUTH_MD5: u32 = 5;
const AUTH_SASL_CONTINUE: u32 = 11;
const AUTH_SASL_FINAL: u32 = 12;
/// Largest login message either side may send (PostgreSQL's `PG_MAX_AUTH_TOKEN_LENGTH`
/// for the client; a server's are smaller still, but an error may carry a long message).
const MAX_LOGIN_MESSAGE: usize = 1 << 16;

/// The login failed; the client has been told why (or is gone).
pub struct Failed;

/// Logs the client in; on success the upstream connection, authenticated, with the rest of
/// the server's startup answer (ParameterStatus, BackendKeyData, ReadyForQuery) still to
/// come through the relay.
pub async fn login<C: Duplex>(
    client: &mut C,
    client_tls: bool,
    startup: &Startup,
    shared: &Shared,
    slot: &Slot,
) -> Result<UpstreamStream, Failed> {
    let timeout = shared.config.authentication_timeout;
    let attempt = async {
        let user = startup.user_and_database().0;
        let secret = if shared.secrets.is_configured() {
            match shared.secrets.lookup(user).await {
                Ok(secret) => secret,
                Err(error) => {
                    // The server still authenticates a relayed login: availability first.
                    tracing::warn!(%error, "cannot look up the user's secret; relaying the login");
                    None
                }
            }
        } else {
            None
        };
        let mut login = Attempt {
            client,
            client_tls,
            startup,
            shared,
            slot,
        };
        match secret {
            Some(secret) => login.by_proxy(secret).await,
            None => login.relayed().await,
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(outcome) => outcome,
        Err(_) => {
            shared.metrics.login(Login::TimedOut);
            let message = format!(
                "authentication did not complete within {} s (cutover authentication_timeout)",
                timeout.as_secs()
            );
            refuse(client, &SqlState::QUERY_CANCELED, &message).await;
            Err(Failed)
        }
    }
}

struct Attempt<'a, C> {
    client: &'a mut C,
    client_tls: bool,
    startup: &'a Startup,
    shared: &'a Shared,
    slot: &'a Slot,
}

/// How the proxy logs in upstream for a client it authenticated.
enum Credentials {
    Password(String),
    Md5(String),
    Keys(ClientKeys),
}

impl<C: Duplex> Attempt<'_, C> {
    fn user(&self) -> &str {
        self.startup.user_and_database().0
    }

    /// The upstream connection with the client's startup packet sent.
    async fn connect(&mut self) -> Result<UpstreamStream, Failed> {
        let shared = self.shared;
        let failed = |error: io::Error| {
            shared.metrics.upstream_connect_failed.increment(1);
            tracing::warn!(%error, upstream = %shared.config.upstream, "cannot reach upstream");
            format!(
                "cutover cannot connect to the database server at {}: {error}",
                shared.config.upstream
            )
        };
        let result =
            match upstream::connect_session(&shared.config.upstream, &shared.upstream_tls).await {
                Ok(mut stream) => match stream.write_all(&self.startup.raw).await {
                    Ok(()) => Ok(stream),
                    Err(e) => Err(failed(e)),
                },
                Err(e) => Err(failed(e)),
            };
        match result {
            Ok(stream) => Ok(stream),
            Err(message) => {
                refuse(
                    self.client,
                    &SqlState::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
                    &message,
                )
                .await;
                Err(Failed)
            }
        }
    }

    /// The server authenticates the client; the proxy passes messages.
    async fn relayed(&mut self) -> Result<UpstreamStream, Failed> {
        let mut upstream = self.connect().await?;
        let upstream_tls = matches!(upstream, tokio_util::either::Either::Right(_));
        loop {
            let (tag, body) = self.server_says(&mut upstream).await?;
            match tag {
                backend::AUTHENTICATION => {
                    let code = messages::auth_code(&body);
                    if code == Some(AUTH_OK) {
                        self.authenticated(Login::Relayed).await?;
                        send(self.client, &frame(tag, &body)).await?;
                        return Ok(upstream);
                    }
                    let out = match code {
                        Some(AUTH_SASL) => messages::sasl_without_channel_binding(&body)
                            .unwrap_or_else(|| frame(tag, &body)),
                        _ => frame(tag, &body),
                    };
                    send(self.client, &out).await?;
                    if code == Some(AUTH_SASL_FINAL) {
                        continue;
                    }
                    let (tag, body) = read_frame(self.client).await.map_err(|_| Failed)?;
                    send(&mut upstream, &frame(tag, &body)).await?;
                    if tag != b'p' {
                        return Err(Failed);
                    }
                }
                backend::ERROR_RESPONSE => {
                    self.shared.metrics.login(Login::Refused);
                    let out = if self.client_tls && upstream_tls {
                        explained_downgrade(&body).unwrap_or_else(|| frame(tag, &body))
                    } else {
                        frame(tag, &body)
                    };
                    send(self.client, &out).await?;
                    return Err(Failed);
                }
                // NegotiateProtocolVersion, a notice: the client's.
                _ => send(self.client, &frame(tag, &body)).await?,
            }
        }
    }

    /// The proxy authenticates the client against `secret`, then logs in upstream.
    async fn by_proxy(&mut self, secret: Secret) -> Result<UpstreamStream, Failed> {
        let (credentials, server_final) = match secret {
            Secret::Md5(inner) => {
                self.md5_from_client(&inner).await?;
                (Credentials::Md5(inner), None)
            }
            Secret::Scram(scram) => {
                let (keys, last) = self.scram_from_client(scram).await?;
                (Credentials::Keys(keys), Some(last))
            }
            Secret::Password(password) => {
                let scram = crate::proxy::auth::ScramSecret::for_password(&password);
                let (_, last) = self.scram_from_client(scram).await?;
                (Credentials::Password(password), Some(last))
            }
        };
        let mut upstream = self.connect().await?;
        self.log_in_upstream(&mut upstream, &credentials).await?;
        self.authenticated(Login::Authenticated).await?;
        let mut out = BytesMut::new();
        if let Some(last) = server_final {
            out.put_slice(&auth_frame(AUTH_SASL_FINAL, last.as_bytes()));
        }
        out.put_slice(&auth_frame(AUTH_OK, &[]));
        send(self.client, &out).await?;
        Ok(upstream)
    }

    /// The client's md5 password packet, checked against the stored md5 secret.
    async fn md5_from_client(&mut self, inner: &str) -> Result<(), Failed> {
        let salt: [u8; 4] = rand::random();
        send(self.client, &auth_frame(AUTH_MD5, &salt)).await?;
        let (tag, body) = read_frame(self.client).await.map_err(|_| Failed)?;
        let expected = md5_response(inner, &salt);
        let given = body.strip_suffix(b"\0").unwrap_or(&body);
        use subtle::ConstantTimeEq;
        if tag == b'p' && bool::from(given.ct_eq(expected.as_bytes())) {
            Ok(())
        } else {
            self.wrong_password("md5 password mismatch").await
        }
    }

    /// A SCRAM exchange with the client, the proxy as its server; the keys the client's
    /// proof revealed and the server-final-message (sent once the server accepted us).
    async fn scram_from_client(
        &mut self,
        secret: crate::proxy::auth::ScramSecret,
    ) -> Result<(ClientKeys, String), Failed> {
        let binding = if self.client_tls {
            self.shared.client_end_point.as_deref()
        } else {
            None
        };
        let mut list = BytesMut::new();
        for mechanism in ServerExchange::mechanisms(binding) {
            list.put_slice(mechanism.as_bytes());
            list.put_u8(0);
        }
        list.put_u8(0);
        send(self.client, &auth_frame(AUTH_SASL, &list)).await?;
        let (tag, body) = read_frame(self.client).await.map_err(|_| Failed)?;
        let Some((mechanism, first)) = sasl_initial_response(&body).filter(|_| tag == b'p') else {
            return self.wrong_password("not a SASLInitialResponse").await;
        };
        let (exchange, server_first) =
            match ServerExchange::start(secret, &mechanism, first, binding) {
                Ok(started) => started,
                Err(error) => return self.scram_refused(error).await,
            };
        send(
            self.client,
            &auth_frame(AUTH_SASL_CONTINUE, server_first.as_bytes()),
        )
        .await?;
        let (tag, body) = read_frame(self.client).await.map_err(|_| Failed)?;
        if tag != b'p' {
            return self.wrong_password("not a SASLResponse").await;
        }
        match exchange.finish(&body) {
            Ok((last, keys)) => Ok((keys, last)),
            Err(error) => self.scram_refused(error).await,
        }
    }

    async fn scram_refused<T>(&mut self, error: scram::ScramError) -> Result<T, Failed> {
        match error {
            scram::ScramError::Proof => self.wrong_password("SCRAM proof mismatch").await,
            other => {
                self.shared.metrics.login(Login::Refused);
                tracing::info!(user = self.user(), %other, "login refused");
                refuse(
                    self.client,
                    &SqlState::PROTOCOL_VIOLATION,
                    &format!("{other} (client's SCRAM exchange with cutover)"),
                )
                .await;
                Err(Failed)
            }
        }
    }

    /// PostgreSQL's answer to a wrong password (the same whether the user exists or not).
    async fn wrong_password<T>(&mut self, why: &str) -> Result<T, Failed> {
        self.shared.metrics.login(Login::Refused);
        tracing::info!(user = self.user(), why, "login refused");
        let message = format!(
            "password authentication failed for user \"{}\"",
            self.user()
        );
        refuse(self.client, &SqlState::INVALID_PASSWORD, &message).await;
        Err(Failed)
    }

    /// Answers the server's authentication requests with `credentials`.
    async fn log_in_upstream(
        &mut self,
        upstream: &mut UpstreamStream,
        credentials: &Credentials,
    ) -> Result<(), Failed> {
        let binding = upstream_end_point(upstream);
        let mut scram: Option<ScramUpstream> = None;
        loop {
            let (tag, body) = self.server_says(upstream).await?;
            match tag {
                backend::AUTHENTICATION => {
                    let code = messages::auth_code(&body).unwrap_or(u32::MAX);
                    let data = &body[4.min(body.len())..];
                    let answer = match (code, credentials) {
                        (AUTH_OK, _) => return Ok(()),
                        (AUTH_CLEARTEXT, Credentials::Password(p)) => password_frame(p.as_bytes()),
                        (AUTH_MD5, Credentials::Password(p)) if data.len() == 4 => {
                            let salt = [data[0], data[1], data[2], data[3]];
                            password_frame(
                                md5_response(&md5_inner(p, self.user()), &salt).as_bytes(),
                            )
                        }
                        (AUTH_MD5, Credentials::Md5(inner)) if data.len() == 4 => {
                            let salt = [data[0], data[1], data[2], data[3]];
                            password_frame(md5_response(inner, &salt).as_bytes())
                        }
                        (AUTH_SASL, _) => {
                            let offered: Vec<&str> = messages::sasl_mechanisms(data)
                                .filter_map(|m| std::str::from_utf8(m).ok())
                                .collect();
                            match ScramUpstream::start(credentials, &offered, binding.clone()) {
                                Some((state, mechanism, first)) => {
                                    scram = Some(state);
                                    sasl_initial_frame(mechanism, &first)
                                }
                                None => {
                                    return self
                                        .cannot_log_in(
                                            "it offers no SASL mechanism cutover can use",
                                        )
                                        .await;
                                }
                            }
                        }
                        (AUTH_SASL_CONTINUE, _) => match scram.as_mut().map(|s| s.respond(data)) {
                            Some(Ok(last)) => frame(b'p', &last),
                            Some(Err(error)) => return self.cannot_log_in(&error).await,
                            None => return self.cannot_log_in("unexpected SASL message").await,
                        },
                        (AUTH_SASL_FINAL, _) => match scram.as_mut().map(|s| s.finish(data)) {
                            Some(Ok(())) => continue,
                            Some(Err(error)) => return self.cannot_log_in(&error).await,
                            None => return self.cannot_log_in("unexpected SASL message").await,
                        },
                        (AUTH_CLEARTEXT | AUTH_MD5, _) => {
                            return self
                                .cannot_log_in(
                                    "it asks for a password (cleartext or md5) and cutover holds only the user's SCRAM secret",
                                )
                                .await;
                        }
                        (code, _) => {
                            return self
                                .cannot_log_in(&format!(
                                    "it asks for an authentication method cutover cannot answer (request {code})"
                                ))
                                .await;
                        }
                    };
                    send(upstream, &answer).await?;
                }
                backend::ERROR_RESPONSE => {
                    // The server's own refusal (no such database, too many connections…).
                    self.shared.metrics.login(Login::Refused);
                    send(self.client, &frame(tag, &body)).await?;
                    return Err(Failed);
                }
                _ => send(self.client, &frame(tag, &body)).await?,
            }
        }
    }

    async fn cannot_log_in<T>(&mut self, why: &str) -> Result<T, Failed> {
        self.shared.metrics.login(Login::Refused);
        tracing::warn!(user = self.user(), %why, "cannot log in upstream for an authenticated client");
        let message = format!(
            "cutover authenticated user \"{}\" but cannot log in to the database server for them: {why}",
            self.user()
        );
        refuse(
            self.client,
            &SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
            &message,
        )
        .await;
        Err(Failed)
    }

    /// The login slot becomes a session slot, or the client hears there is no room.
    async fn authenticated(&mut self, how: Login) -> Result<(), Failed> {
        match self.slot.authenticated() {
            Ok(()) => {
                self.shared.metrics.login(how);
                Ok(())
            }
            Err(_) => {
                self.shared.metrics.login(Login::TooMany);
                self.shared.metrics.rejected_limit.increment(1);
                refuse(
                    self.client,
                    &SqlState::TOO_MANY_CONNECTIONS,
                    "sorry, too many clients already (cutover max_client_connections)",
                )
                .await;
                Err(Failed)
            }
        }
    }

    /// One server message; a server gone mid-login is the client's 08006.
    async fn server_says(&mut self, upstream: &mut UpstreamStream) -> Result<(u8, Bytes), Failed> {
        match read_frame(upstream).await {
            Ok(message) => Ok(message),
            Err(error) => {
                self.shared.metrics.upstream_lost.increment(1);
                let message =
                    format!("the database server closed the connection during login: {error}");
                refuse(self.client, &SqlState::CONNECTION_FAILURE, &message).await;
                Err(Failed)
            }
        }
    }
}

/// SCRAM towards the server: with the password, postgres-protocol's client; with keys, ours.
enum ScramUpstream {
    Password(postgres_protocol::authentication::sasl::ScramSha256),
    Keys(Box<ClientExchange>),
}

impl ScramUpstream {
    fn start(
        credentials: &Credentials,
        offered: &[&str],
        binding: Option<Vec<u8>>,
    ) -> Option<(Self, &'static str, Vec<u8>)> {
        use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
        match credentials {
            Credentials::Keys(keys) => {
                let (exchange, mechanism, first) =
                    ClientExchange::start(keys.clone(), offered, binding)?;
                Some((
                    Self::Keys(Box::new(exchange)),
                    mechanism,
                    first.into_bytes(),
                ))
            }
            Credentials::Password(password) => {
                let (mechanism, binding) = match binding {
                    Some(b) if offered.contains(&scram::MECHANISM_PLUS) => (
                        scram::MECHANISM_PLUS,
                        ChannelBinding::tls_server_end_point(b),
                    ),
                    _ if offered.contains(&scram::MECHANISM) => {
                        (scram::MECHANISM, ChannelBinding::unsupported())
                    }
                    _ => return None,
                };
                let client = ScramSha256::new(password.as_bytes(), binding);
                let first = client.message().to_vec();
                Some((Self::Password(client), mechanism, first))
            }
            Credentials::Md5(_) => None,
        }
    }

    fn respond(&mut self, server_first: &[u8]) -> Result<Vec<u8>, String> {
        match self {
            Self::Password(client) => {
                client.update(server_first).map_err(|e| e.to_string())?;
                Ok(client.message().to_vec())
            }
            Self::Keys(exchange) => exchange
                .respond(server_first)
                .map(String::into_bytes)
                .map_err(|e| e.to_string()),
        }
    }

    fn finish(&mut self, server_final: &[u8]) -> Result<(), String> {
        match self {
            Self::Password(client) => client.finish(server_final).map_err(|e| e.to_string()),
            Self::Keys(exchange) => exchange.finish(server_final).map_err(|e| e.to_string()),
        }
    }
}

/// The server's channel-binding data, when the upstream leg is TLS.
fn upstream_end_point(upstream: &UpstreamStream) -> Option<Vec<u8>> {
    match upstream {
        tokio_util::either::Either::Right(tls) => tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|certs| certs.first())
            .and_then(|cert| crate::net::tls::end_point(cert)),
        tokio_util::either::Either::Left(_) => None,
    }
}

/// The server refused a relayed SCRAM login as a channel-binding downgrade: the proxy took
/// `-PLUS` out of the list because it cannot bind across itself, and a client on TLS then
/// says "y". The client gets the server's error with the cause and the way out.
fn explained_downgrade(body: &[u8]) -> Option<Bytes> {
    let fields: Vec<(u8, &[u8])> = error_field_list(body).collect();
    let message = fields.iter().find(|(k, _)| *k == b'M')?.1;
    if !message.starts_with(b"SCRAM channel binding negotiation error") {
        return None;
    }
    const DETAIL: &[u8] = b"cutover relays logins and cannot take part in SCRAM channel binding: the client's connection to cutover and cutover's connection to the server are two TLS connections, and the client, which could bind, was not offered binding.";
    const HINT: &[u8] = b"Configure auth_file or auth_url so that cutover authenticates clients itself (docs/tls-and-authentication.md), or connect with channel_binding=disable.";
    let kept = fields
        .into_iter()
        .filter(|(k, _)| *k != b'D' && *k != b'H')
        .chain([(b'D', DETAIL), (b'H', HINT)]);
    Some(messages::error_frame(kept))
}

fn auth_frame(code: u32, data: &[u8]) -> Bytes {
    let mut body = BytesMut::with_capacity(4 + data.len());
    body.put_u32(code);
    body.put_slice(data);
    frame(backend::AUTHENTICATION, &body)
}

fn password_frame(password: &[u8]) -> Bytes {
    let mut body = BytesMut::with_capacity(password.len() + 1);
    body.put_slice(password);
    body.put_u8(0);
    frame(b'p', &body)
}

fn sasl_initial_frame(mechanism: &str, data: &[u8]) -> Bytes {
    let mut body = BytesMut::new();
    body.put_slice(mechanism.as_bytes());
    body.put_u8(0);
    body.put_i32(data.len() as i32);
    body.put_slice(data);
    frame(b'p', &body)
}

/// A SASLInitialResponse: the mechanism and the initial data.
fn sasl_initial_response(mut body: &[u8]) -> Option<(String, &[u8])> {
    let mechanism = crate::wire::take_cstr(&mut body)?;
    let len = i32::from_be_bytes(body.get(..4)?.try_into().ok()?);
    let data = body.get(4..)?;
    let data = if len < 0 {
        &[][..]
    } else {
        data.get(..len as usize)?
    };
    Some((String::from_utf8(mechanism.to_vec()).ok()?, data))
}

/// One message, read exactly (a header, then its body): nothing after it is consumed.
async fn read_frame<R: AsyncRead + Unpin>(stream: &mut R) -> io::Result<(u8, Bytes)> {
    let mut header = [0u8; 5];
    stream.read_exact(&mut header).await?;
    let invalid = |e: String| io::Error::new(io::ErrorKind::InvalidData, e);
    let header = crate::wire::header(&header, MAX_LOGIN_MESSAGE + 1)
        .map_err(|e| invalid(e.to_string()))?
        .ok_or_else(|| invalid("a short header".into()))?;
    let mut body = vec![0u8; header.total - 5];
    stream.read_exact(&mut body).await?;
    Ok((header.tag, Bytes::from(body)))
}

async fn send<W: AsyncWrite + Unpin>(stream: &mut W, bytes: &[u8]) -> Result<(), Failed> {
    match stream.write_all(bytes).await {
        Ok(()) => stream.flush().await.map_err(|_| Failed),
        Err(_) => Err(Failed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sasl_messages_parse() {
        let frame = sasl_initial_frame("SCRAM-SHA-256", b"n,,n=,r=abc");
        let (mechanism, data) = sasl_initial_response(&frame[5..]).unwrap();
        assert_eq!(
            (mechanism.as_str(), data),
            ("SCRAM-SHA-256", &b"n,,n=,r=abc"[..])
        );
        assert_eq!(
            messages::sasl_mechanisms(b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0").collect::<Vec<_>>(),
            [&b"SCRAM-SHA-256-PLUS"[..], b"SCRAM-SHA-256"]
        );
        assert!(sasl_initial_response(b"SCRAM\0\0\0").is_none());
    }

    #[test]
    fn a_downgrade_refusal_says_why_and_what_to_do() {
        let error = messages::error_frame([
            (b'S', &b"FATAL"[..]),
            (b'C', b"08P01"),
            (b'M', b"SCRAM channel binding negotiation error"),
            (
                b'D',
                b"The client supports SCRAM channel binding but thinks the server does not.",
            ),
        ]);
        let explained = explained_downgrade(&error[5..]).unwrap();
        let text = String::from_utf8_lossy(&explained);
        assert!(
            text.contains("08P01") && text.contains("auth_file"),
            "{text}"
        );
        let other = messages::error_frame([(b'S', &b"FATAL"[..]), (b'M', b"no")]);
        assert!(explained_downgrade(&other[5..]).is_none());
    }
}
