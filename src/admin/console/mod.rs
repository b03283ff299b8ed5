//! The admin console: a PostgreSQL endpoint on the proxy's own port, as pgbouncer users
//! expect. `psql postgres://ops@proxy:6432/cutover` with the token named `ops` as password;
//! JDBC, psycopg and GUI tools connect the same way.
//!
//! Built on `pgwire` (here the proxy *is* the server, so decoding every message is right,
//! unlike in the relay): SCRAM-SHA-256 (with `-PLUS` bound to the proxy's certificate over
//! TLS; the proxy's own SCRAM server, [`crate::proxy::auth::scram`], in pgwire's driver), the simple and the extended protocol (`$n` parameters, Describe, pipelining), and
//! what drivers and pools send on their own (BEGIN/COMMIT, SET, DISCARD ALL, SELECT 1). The
//! commands are in [`command`] (`SHOW HELP` lists them), what they do in [`execute`].
//!
//! The listener has answered SSLRequest and read the startup packet by the time a session
//! turns out to be the console's: the console takes the same socket (TLS or not) with that
//! packet put back in front of it, and pgwire goes on from there.
//!
//! Served by the proxy itself: no upstream connection is opened. Only enabled when admin
//! tokens are configured; otherwise a database named `cutover` is relayed like any other.
//! Read tokens may log in and read; changes need an admin token. The console has no
//! transactions: every command takes effect when it runs.

pub mod command;
pub mod execute;
pub mod stats;

use std::{
    fmt::Debug,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use async_trait::async_trait;
use bytes::BytesMut;
use futures_util::{Sink, SinkExt, StreamExt, stream};
use pgwire::{
    api::{
        ClientInfo, ClientPortalStore, DefaultClient, NoopHandler, PgWireConnectionState, Type,
        auth::{
            AuthDriver, DefaultServerParameterProvider, StartupHandler,
            driver::AuthOutcome,
            mechanism::{AuthMechanism, AuthState},
            protocol_negotiation, save_startup_parameters_to_metadata,
        },
        portal::{Format, Portal},
        query::{ExtendedQueryHandler, SimpleQueryHandler},
        results::{DataRowEncoder, FieldInfo, QueryResponse, Response, Tag},
        stmt::QueryParser,
        store::PortalStore,
    },
    error::{ErrorInfo, PgWireError, PgWireResult},
    messages::{
        PgWireBackendMessage, PgWireFrontendMessage,
        response::NoticeResponse,
        startup::{Authentication, PasswordMessageFamily},
    },
    tokio::server::{PgWireMessageServerCodec, process_error, process_message},
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_postgres::error::SqlState;
use tokio_util::codec::{Framed, FramedParts};

use self::{
    command::{Command, Syntax, Token},
    execute::{Answer, Failed, Value},
};
use crate::{
    proxy::auth::scram::{ScramSecret, ServerExchange},
    proxy::session::{
        self, Shared,
        clients::{Client, State},
        slots::Slot,
    },
    wire::Startup,
};

/// The database name that opens the console.
pub const DATABASE: &str = "cutover";

/// Whether this startup is for the console.
pub fn wanted(shared: &Shared, startup: &Startup) -> bool {
    !shared.tokens.load().admin.is_empty() && startup.user_and_database().1 == DATABASE
}

/// The console as the proxy's other service on its port ([`session::Endpoint`]).
pub struct Endpoint;

impl session::Endpoint for Endpoint {
    fn wants(&self, shared: &Shared, startup: &Startup) -> bool {
        wanted(shared, startup)
    }

    fn serve<'a>(
        &'a self,
        socket: Box<dyn session::Socket>,
        tls: bool,
        peer: Option<SocketAddr>,
        startup: Startup,
        shared: &'a Shared,
        slot: &'a Slot,
        me: &'a Client,
    ) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        Box::pin(run(socket, tls, peer, startup, shared, slot, me))
    }
}

/// What a console user's token lets them do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Admin,
    Read,
}

/// Serves one console session to its end, on the socket the listener negotiated (`tls`), with
/// the startup packet already read.
pub async fn run<C>(
    socket: C,
    tls: bool,
    peer: Option<SocketAddr>,
    startup: Startup,
    shared: &Shared,
    slot: &Slot,
    me: &Client,
) where
    C: AsyncRead + AsyncWrite + Unpin + Send + Sync + 'static,
{
    let user = startup.user_and_database().0.to_owned();
    let addr = peer.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
    let codec = PgWireMessageServerCodec::new(DefaultClient::new(addr, tls));
    let mut parts = FramedParts::new(socket, codec);
    parts.read_buf = BytesMut::from(&startup.raw[..]);
    let mut socket = Framed::from_parts(parts);
    socket.set_state(PgWireConnectionState::AwaitingStartup);

    let role = std::sync::OnceLock::new();
    let login = Arc::new(Login::new(shared, slot, &user, tls, &role));
    let console = Arc::new(Console {
        shared,
        user: user.clone(),
        role: &role,
        me,
        changes_in_block: AtomicUsize::new(0),
    });
    let noop = Arc::new(NoopHandler);

    let login_deadline = tokio::time::sleep(shared.config.authentication_timeout);
    tokio::pin!(login_deadline);
    loop {
        let logging_in = matches!(
            socket.state(),
            PgWireConnectionState::AwaitingStartup
                | PgWireConnectionState::AuthenticationInProgress
        );
        let message = if logging_in {
            tokio::select! {
                _ = &mut login_deadline => {
                    tracing::info!(%user, "console login timed out");
                    return;
                }
                message = socket.next() => message,
            }
        } else {
            socket.next().await
        };
        let Some(Ok(message)) = message else {
            return;
        };
        if matches!(message, PgWireFrontendMessage::Terminate(_)) {
            return;
        }
        let extended = message.is_extended_query();
        if let Err(error) = process_message(
            message,
            &mut socket,
            Arc::clone(&login),
            Arc::clone(&console),
            Arc::clone(&console),
            Arc::clone(&noop),
            Arc::clone(&noop),
        )
        .await
        {
            let fatal = error.is_fatal();
            if process_error(&mut socket, error, extended).await.is_err() || fatal {
                return;
            }
        }
    }
}

/// Answers a login: SCRAM against the token named as the user.
struct Login<'a> {
    driver: AuthDriver<Arc<DefaultServerParameterProvider>>,
    shared: &'a Shared,
    slot: &'a Slot,
    user: String,
    /// The proxy certificate's channel-binding data, on a TLS connection.
    binding: Option<Vec<u8>>,
    role: &'a std::sync::OnceLock<Role>,
}

impl<'a> Login<'a> {
    fn new(
        shared: &'a Shared,
        slot: &'a Slot,
        user: &str,
        tls: bool,
        role: &'a std::sync::OnceLock<Role>,
    ) -> Self {
        let mut parameters = DefaultServerParameterProvider::default();
        parameters.server_version = format!("15.0 ({})", execute::version());
        parameters.date_style = "ISO, MDY".into();
        Self {
            driver: AuthDriver::new(Arc::new(parameters)),
            shared,
            slot,
            user: user.to_owned(),
            binding: shared.client_end_point.clone().filter(|_| tls),
            role,
        }
    }

    /// The SCRAM exchange for this login, with the secret of the token named as the user —
    /// or, for a name no token has, a random one: it fails at the proof like a wrong token,
    /// in the same time.
    fn scram(&self) -> Box<TokenScram> {
        let tokens = self.shared.tokens.load();
        let token = tokens
            .admin
            .iter()
            .chain(&tokens.read)
            .find(|(name, _)| *name == self.user)
            .map(|(_, token)| token.clone())
            .unwrap_or_else(|| hex::encode(rand::random::<[u8; 32]>()));
        Box::new(TokenScram {
            secret: Some(ScramSecret::for_password(&token)),
            binding: self.binding.clone(),
            exchange: None,
        })
    }

    fn fatal(code: &SqlState, message: String) -> PgWireError {
        PgWireError::UserError(Box::new(ErrorInfo::new(
            "FATAL".into(),
            code.code().into(),
            message,
        )))
    }
}

#[async_trait]
impl StartupHandler for Login<'_> {
    async fn on_startup<C>(
        &self,
        client: &mut C,
        message: PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let outcome = match message {
            PgWireFrontendMessage::Startup(ref startup) => {
                protocol_negotiation(client, startup).await?;
                save_startup_parameters_to_metadata(client, startup);
                self.driver.begin_authentication(client, self.scram()).await
            }
            PgWireFrontendMessage::PasswordMessageFamily(message) => {
                self.driver.advance_authentication(client, message).await
            }
            _ => return Ok(()),
        };
        match outcome {
            Ok(AuthOutcome::InProgress) => Ok(()),
            Ok(AuthOutcome::Authenticated { final_message, .. }) => {
                let tokens = self.shared.tokens.load();
                let role = if tokens.admin.iter().any(|(n, _)| *n == self.user) {
                    Role::Admin
                } else {
                    Role::Read
                };
                if self.slot.authenticated().is_err() {
                    return Err(Self::fatal(
                        &SqlState::TOO_MANY_CONNECTIONS,
                        "sorry, too many clients already (cutover max_client_connections)".into(),
                    ));
                }
                let _ = self.role.set(role);
                tracing::info!(user = %self.user, ?role, "console session");
                self.driver
                    .complete_authentication(client, final_message)
                    .await
            }
            Err(error) => {
                tracing::debug!(%error, "console login refused");
                self.shared
                    .throttle
                    .failed(crate::proxy::auth::Surface::Console)
                    .await;
                Err(Self::fatal(
                    &SqlState::INVALID_PASSWORD,
                    format!(
                        "password authentication failed for console user \"{}\"",
                        self.user
                    ),
                ))
            }
        }
    }
}

/// SCRAM-SHA-256 (`-PLUS` on TLS) through the proxy's own SCRAM server, the one its logins
/// of application users use ([`crate::proxy::auth::scram`]: PostgreSQL's channel-binding rules, a
/// downgrade refused), driven by pgwire's authentication driver.
struct TokenScram {
    secret: Option<ScramSecret>,
    binding: Option<Vec<u8>>,
    exchange: Option<ServerExchange>,
}

#[async_trait]
impl AuthMechanism for TokenScram {
    async fn begin(&mut self, _client: &(dyn ClientInfo + Send + Sync)) -> PgWireResult<AuthState> {
        let mechanisms = ServerExchange::mechanisms(self.binding.as_deref());
        Ok(AuthState::InProgress(Authentication::SASL(
            mechanisms.iter().map(|m| (*m).to_owned()).collect(),
        )))
    }

    async fn next(
        &mut self,
        _client: &(dyn ClientInfo + Send + Sync),
        message: PasswordMessageFamily,
    ) -> PgWireResult<AuthState> {
        let refused = |e: crate::proxy::auth::scram::ScramError| {
            PgWireError::InvalidScramMessage(e.to_string())
        };
        match (self.exchange.take(), self.secret.take()) {
            (None, Some(secret)) => {
                let first = message.into_sasl_initial_response()?;
                let (exchange, server_first) = ServerExchange::start(
                    secret,
                    &first.auth_method,
                    first.data.as_deref().unwrap_or_default(),
                    self.binding.as_deref(),
                )
                .map_err(refused)?;
                self.exchange = Some(exchange);
                Ok(AuthState::InProgress(Authentication::SASLContinue(
                    server_first.into(),
                )))
            }
            (Some(exchange), _) => {
                let last = message.into_sasl_response()?;
                let (server_final, _keys) = exchange.finish(&last.data).map_err(refused)?;
                Ok(AuthState::Ok {
                    final_message: Some(Authentication::SASLFinal(server_final.into())),
                    identity: None,
                })
            }
            (None, None) => Err(PgWireError::InvalidSASLState),
        }
    }
}

/// A console session's commands.
struct Console<'a> {
    shared: &'a Shared,
    user: String,
    role: &'a std::sync::OnceLock<Role>,
    me: &'a Client,
    /// Changes made since the client's BEGIN (they stay: the ROLLBACK notice says so).
    changes_in_block: AtomicUsize,
}

fn error(code: &SqlState, message: impl Into<String>) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        "ERROR".into(),
        code.code().into(),
        message.into(),
    )))
}

fn syntax(error_: Syntax) -> PgWireError {
    error(&SqlState::SYNTAX_ERROR, error_.0)
}

fn notice(message: String) -> PgWireBackendMessage {
    PgWireBackendMessage::NoticeResponse(NoticeResponse::from(ErrorInfo::new(
        "NOTICE".into(),
        "00000".into(),
        message,
    )))
}

/// The columns of a command, in the formats the client asked for.
fn schema(command: &Command, format: &Format) -> Arc<Vec<FieldInfo>> {
    Arc::new(
        command
            .columns()
            .iter()
            .enumerate()
            .map(|(i, (name, ty))| {
                FieldInfo::new((*name).into(), None, None, ty.clone(), format.format_for(i))
            })
            .collect(),
    )
}

/// An answer's rows as pgwire sends them.
fn query_response(
    schema: Arc<Vec<FieldInfo>>,
    rows: Vec<Vec<Value>>,
) -> PgWireResult<QueryResponse> {
    let mut encoder = DataRowEncoder::new(Arc::clone(&schema));
    let mut encoded = Vec::with_capacity(rows.len());
    for row in rows {
        for (value, field) in row.iter().zip(schema.iter()) {
            match value {
                Value::Text(v) => encoder.encode_field(v)?,
                Value::Int(v) if *field.datatype() == Type::INT4 => {
                    encoder.encode_field(&v.map(|n| n as i32))?
                }
                Value::Int(v) => encoder.encode_field(v)?,
                Value::Float(v) => encoder.encode_field(v)?,
                Value::Bool(v) => encoder.encode_field(v)?,
            }
        }
        encoded.push(Ok(encoder.take_row()));
    }
    Ok(QueryResponse::new(schema, stream::iter(encoded)))
}

impl Console<'_> {
    fn role(&self) -> Role {
        self.role.get().copied().unwrap_or(Role::Read)
    }

    /// Runs one command and says what to answer (the notices are sent first).
    async fn run<C>(
        &self,
        client: &mut C,
        command: &Command,
        format: &Format,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        if command.changes_state() && self.role() == Role::Read {
            return Err(error(
                &SqlState::INSUFFICIENT_PRIVILEGE,
                format!(
                    "\"{}\" is a read token: it may not change anything (an admin token may)",
                    self.user
                ),
            ));
        }
        let in_block =
            client.transaction_status() != pgwire::messages::response::TransactionStatus::Idle;
        match command {
            Command::Begin => self.changes_in_block.store(0, Ordering::Relaxed),
            Command::Rollback => {
                let n = self.changes_in_block.swap(0, Ordering::Relaxed);
                if n > 0 {
                    client
                        .feed(notice(format!(
                            "the cutover console has no transactions: the {n} change(s) made since BEGIN stay"
                        )))
                        .await?;
                }
            }
            Command::Commit => self.changes_in_block.store(0, Ordering::Relaxed),
            _ => {}
        }
        self.me.set(State::Active);
        let result = execute::execute(self.shared, &self.user, command).await;
        self.me.set(State::Idle);
        let Answer {
            rows,
            tag,
            notice: said,
        } = match result {
            Ok(answer) => answer,
            Err(Failed(code, message)) => return Err(error(&code, message)),
        };
        if command.changes_state() && in_block {
            self.changes_in_block.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(message) = said {
            client.feed(notice(message)).await?;
        }
        Ok(match command {
            Command::Begin => Response::TransactionStart(Tag::new(&tag)),
            Command::Commit | Command::Rollback => Response::TransactionEnd(Tag::new(&tag)),
            _ if command.columns().is_empty() => Response::Execution(Tag::new(&tag)),
            _ => {
                let mut response = query_response(schema(command, format), rows)?;
                response.set_command_tag(&tag);
                Response::Query(response)
            }
        })
    }
}

#[async_trait]
impl SimpleQueryHandler for Console<'_> {
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let statements = command::statements(query).map_err(syntax)?;
        let mut responses = Vec::with_capacity(statements.len());
        for tokens in statements {
            if command::parameters(&tokens) > 0 {
                responses.push(Response::Error(Box::new(ErrorInfo::from(syntax(Syntax(
                    "$n parameters are for the extended protocol".into(),
                ))))));
                break;
            }
            // The first error ends the query string, as in PostgreSQL.
            let answer = match Command::parse(&tokens) {
                Ok(command) => self.run(client, &command, &Format::UnifiedText).await,
                Err(e) => Err(syntax(e)),
            };
            match answer {
                Ok(response) => responses.push(response),
                Err(e) => {
                    responses.push(Response::Error(Box::new(ErrorInfo::from(e))));
                    break;
                }
            }
        }
        if responses.is_empty() {
            responses.push(Response::EmptyQuery);
        }
        Ok(responses)
    }
}

/// A statement prepared on the console: its tokens, its parameter count, and the command it
/// is (read with every parameter as a placeholder), which gives its columns before a Bind.
#[derive(Debug, Clone)]
pub struct Prepared {
    tokens: Vec<Token>,
    parameters: usize,
    shape: Command,
}

/// Reads Parse messages into [`Prepared`] statements.
#[derive(Debug, Default)]
pub struct Parser;

#[async_trait]
impl QueryParser for Parser {
    type Statement = Prepared;

    async fn parse_sql<C>(
        &self,
        _client: &C,
        sql: &str,
        _types: &[Option<Type>],
    ) -> PgWireResult<Option<Prepared>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        let mut statements = command::statements(sql).map_err(syntax)?;
        if statements.len() > 1 {
            return Err(syntax(Syntax(
                "cannot insert multiple commands into a prepared statement".into(),
            )));
        }
        let Some(tokens) = statements.pop() else {
            return Ok(None);
        };
        let parameters = command::parameters(&tokens);
        let placeholders = vec![Some("0".to_owned()); parameters];
        let shape = command::bind(&tokens, &placeholders)
            .and_then(|t| Command::parse(&t))
            .map_err(syntax)?;
        Ok(Some(Prepared {
            tokens,
            parameters,
            shape,
        }))
    }

    fn get_parameter_types(&self, statement: &Prepared) -> PgWireResult<Vec<Type>> {
        Ok(vec![Type::TEXT; statement.parameters])
    }

    fn get_result_schema(
        &self,
        statement: &Prepared,
        format: Option<&Format>,
    ) -> PgWireResult<Vec<FieldInfo>> {
        Ok(schema(&statement.shape, format.unwrap_or(&Format::UnifiedText)).to_vec())
    }
}

/// A Bind's parameter as text: sent as text, or in binary as a string or an integer.
fn parameter(portal: &Portal<Prepared>, i: usize) -> PgWireResult<Option<String>> {
    let Some(Some(bytes)) = portal.parameters.get(i) else {
        return Ok(None);
    };
    if portal.parameter_format.is_text(i) {
        return String::from_utf8(bytes.to_vec()).map(Some).map_err(|_| {
            error(
                &SqlState::CHARACTER_NOT_IN_REPERTOIRE,
                "a parameter is not UTF-8",
            )
        });
    }
    let declared = portal
        .statement
        .parameter_types
        .get(i)
        .cloned()
        .flatten()
        .unwrap_or(Type::TEXT);
    let as_int = |b: &[u8]| -> Option<i64> {
        match b.len() {
            2 => Some(i64::from(i16::from_be_bytes([b[0], b[1]]))),
            4 => Some(i64::from(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))),
            8 => Some(i64::from_be_bytes(b.try_into().ok()?)),
            _ => None,
        }
    };
    let value = match declared {
        Type::INT2 | Type::INT4 | Type::INT8 => as_int(bytes).map(|n| n.to_string()),
        _ => String::from_utf8(bytes.to_vec()).ok(),
    };
    value.map(Some).ok_or_else(|| {
        error(
            &SqlState::INVALID_BINARY_REPRESENTATION,
            format!(
                "parameter ${} of type {declared} cannot be read; send it as text",
                i + 1
            ),
        )
    })
}

#[async_trait]
impl ExtendedQueryHandler for Console<'_> {
    type Statement = Prepared;
    type QueryParser = Parser;

    fn query_parser(&self) -> Arc<Parser> {
        Arc::new(Parser)
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &Portal<Prepared>,
        _max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Prepared>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let statement = &portal.statement.statement;
        let values = (0..statement.parameters)
            .map(|i| parameter(portal, i))
            .collect::<PgWireResult<Vec<_>>>()?;
        let command = command::bind(&statement.tokens, &values)
            .and_then(|t| Command::parse(&t))
            .map_err(syntax)?;
        self.run(client, &command, &portal.result_column_format)
            .await
    }
}

#[cfg(test)]
mod tests {
    use pgwire::api::results::FieldFormat;

    use super::*;

    #[test]
    fn every_kind_of_value_is_encoded_in_both_formats() {
        let row = vec![
            Value::Int(Some(7)),
            Value::text("console"),
            Value::Text(None),
            Value::Text(Some("db".into())),
            Value::Text(Some(String::new())),
            Value::Text(None),
            Value::Bool(true),
            Value::text("idle"),
            Value::text("2026-01-01T00:00:00Z"),
            Value::text("2026-01-01T00:00:00Z"),
            Value::Int(Some(3)),
        ];
        for format in [Format::UnifiedText, Format::UnifiedBinary] {
            let clients = schema(&Command::Clients, &format);
            assert!(query_response(clients, vec![row.clone()]).is_ok());
        }
        let one = schema(&Command::SelectOne, &Format::UnifiedText);
        assert_eq!(one[0].datatype(), &Type::INT4);
        assert!(query_response(one, vec![vec![Value::Int(Some(1))]]).is_ok());
        assert_eq!(
            FieldFormat::Text,
            schema(&Command::Stats, &Format::UnifiedText)[0].format()
        );
    }
}
