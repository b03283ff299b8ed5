//! What a session knows of its statements, and where the stages of the data path plug into
//! the relay: every Query and Parse is classified, every execution routed, counted and, when
//! sampled, held for the shadow until the client has its answer ([`super::pending::Flow::defer`]).
//!
//! Routing (the stage and the sticky bucket of [`crate::routing::route`]):
//! - a simple Query served by the target is sent as its target SQL instead;
//! - a prepared statement is routed per execution, at its Bind: the first Bind that goes to
//!   the target prepares the statement's target variant beside it (a Close and a Parse the
//!   proxy adds, whose answers the relay takes out — see [`super::pending`]), and every Bind
//!   that goes to the target names that variant instead of the client's statement;
//! - a statement is served by the target only after its [route check](crate::routing::route::check)
//!   found that the client would not notice (same parameters, same columns and types);
//! - writes and locking reads go to their transaction's write side: the first of a
//!   transaction decides it from the table's (the target once every write type is at
//!   `target`), and the rest follow (docs/routing.md, "One transaction, one write side");
//!   reads go by bucket from `cutover N%` on.

use std::sync::Arc;

use arc_swap::{ArcSwap, Cache};
use bytes::{BufMut, Bytes};

use super::{
    Shared,
    by_name::ByName,
    pending::{Awaited, Described, Flow, LegacyColumns, Resolution},
    prepared::{TARGET_PREFIX, deallocates},
};
use crate::{
    metrics::Served,
    routing::classify::{BucketKey, Classification, Classifier, Typed},
    routing::rewrite::Rewrite,
    routing::route::{self, Side, check::Check},
    routing::rules::{RuleSet, Stage},
    shadow::{self, Shadow},
    wire::messages::{self, frontend},
};

/// Bind messages up to this size are read whole when the statement may be routed or
/// compared (to read the key, copy the parameters or name the target variant); larger ones
/// stream through, served by legacy and not compared.
pub const MAX_INSPECTED_BIND: usize = 64 * 1024;

/// The room [`Statements::bind`]'s frames keep from one Bind to the next: a Bind's start,
/// and the Close and Parse of a target variant of ordinary length (those of a longer one
/// are let go at the next).
const FRAMES_KEPT: usize = 512;

/// How long a statement waits for the answer to the proxy's names question (one round trip,
/// once per session and after statements that may change it) before it is served by legacy.
const NAMES_PATIENCE: std::time::Duration = std::time::Duration::from_secs(2);

/// How long a write whose transaction writes the target waits for its route check (made
/// once per statement, in milliseconds) before legacy serves it.
const CHECK_PATIENCE: std::time::Duration = std::time::Duration::from_secs(2);

/// A route check a statement waits for.
pub struct Awaitable {
    key: String,
    legacy: Arc<str>,
    target: String,
    types: Arc<[u32]>,
}

pub struct Statements<'s> {
    shared: &'s Shared,
    /// The classifier this session saw last, checked against the shared one with one atomic
    /// load per statement (not loaded through its debt list at each).
    classifier: Cache<&'s ArcSwap<Classifier>, Arc<Classifier>>,
    shadow: Option<&'s Shadow>,
    /// The session's bucketing key when the rule names none.
    session_key: String,
    /// Shared with the server side: the answers owed, unsettled writes (reads stay on
    /// legacy meanwhile), whether routing broke.
    flow: &'s Flow,
    statements: ByName<Prepared>,
    portals: ByName<Portal>,
    /// Numbers the Parse messages sent (the client's and the proxy's).
    parses: u64,
    /// The classification of the Query about to be inspected, when
    /// [`Self::query_check_to_await`] made it (so that it is not made twice).
    ahead: Option<Classified>,
    /// What the names watch said of the Parse about to be inspected (`Some(true)`: nothing
    /// in its text changes what names resolve to), from [`Self::names_question`], which
    /// sees every Parse just before it is inspected.
    watched: Option<bool>,
    /// The frames sent in place of a Bind routed to the target ([`Self::bind`]), built here
    /// and copied with the rest of the read: kept from one Bind to the next, not allocated
    /// for each.
    frames: Vec<u8>,
}

/// A statement's counters, and its classification when it is on the legacy table.
type Classified = (Served, Option<Arc<Classification>>);

/// A prepared statement.
struct Prepared {
    served: Served,
    /// On the legacy table: what routing and the shadow need.
    typed: Option<Arc<Source>>,
    /// Its target variant has been prepared since the client last prepared it.
    target_ready: bool,
    /// The Parse that created it, and the one that prepared its variant (see
    /// [`Awaited::Parse`]).
    parsed: u64,
    variant_parsed: u64,
    /// The server confirmed the variant's Parse; until then a Bind in a later batch prepares
    /// it again (its batch may have failed, and the answer not be in yet).
    variant_confirmed: bool,
    /// The batch the variant's Parse was sent in.
    variant_batch: u64,
    /// What its route check said, kept for its next Binds.
    variant: Option<Variant>,
    /// Its query type's live stage and the live state's generation it was read in
    /// (`Control::generation`).
    stage: Option<(u64, Stage)>,
    /// The names watch found nothing in its text: a Parse of the same text under the same
    /// name is not searched again.
    names_quiet: bool,
}

/// What a statement parsed again as it was keeps: its counters, its classification and its
/// live stage as last read (see `Statements::parsed_again`).
type Reparsed = (Served, Option<Arc<Source>>, Option<(u64, Stage)>);

/// A prepared statement's route check, as its Binds use it: read once per statement (and
/// again after the rules change), not looked up by its SQL text at every execution.
struct Variant {
    /// The checks' generation it was read in (`Checks::generation`).
    generation: u64,
    /// `None` when the check refused it (legacy serves it).
    ready: Option<ReadyVariant>,
}

/// A target variant the route check said yes to.
struct ReadyVariant {
    /// The name it is prepared under: `cutover_t_` and the client's name in hex.
    name: Box<[u8]>,
    param_types: Arc<[u32]>,
    /// Its columns, as legacy describes them.
    described: Described,
}

/// A statement on the legacy table, as parsed.
struct Source {
    classification: Arc<Classification>,
    sql: Arc<str>,
    param_types: Arc<[u32]>,
    rules: Arc<RuleSet>,
    /// Its route check's key, made the first time it is needed (then once per statement,
    /// not once per execution).
    check_key: std::sync::OnceLock<String>,
}

impl Source {
    /// A prepared statement's route check: per rules, declared parameter types and SQL text.
    fn check_key(&self) -> &str {
        self.check_key.get_or_init(|| {
            format!(
                "p:{}:{:?}:{}",
                self.rules.version, self.param_types, self.sql
            )
        })
    }

    fn typed(&self) -> &Typed {
        match &*self.classification {
            Classification::Typed(t) => t,
            // Only typed classifications are kept in a Source.
            _ => unreachable!("a Source holds a typed classification"),
        }
    }
}

/// How legacy describes the columns, as the relay rewrites a RowDescription.
fn described(columns: &[crate::routing::route::check::LegacyColumn]) -> Described {
    LegacyColumns::new(columns.iter().map(|c| (c.table_oid, c.attnum, c.typmod)))
}

/// Whether a stage may serve anything from the target.
fn may_route(stage: Stage) -> bool {
    !matches!(stage, Stage::Legacy | Stage::Shadow)
}

/// Whether executions of `t` are served where its transaction writes: a write, or a locking
/// read (`FOR UPDATE`, `FOR SHARE`, …).
fn on_write_side(t: &Typed) -> bool {
    t.write_tag.is_some() || t.locking
}

/// The target SQL of a write or locking read that the target can serve.
fn routed_write(t: &Typed) -> Option<&str> {
    match &t.route {
        Rewrite::Target(target) if on_write_side(t) => Some(target),
        _ => None,
    }
}

/// What [`Statements::bind_needs_whole`] found, for a Bind read whole.
#[derive(Debug, Clone, Copy)]
pub struct Whole {
    /// The statement's live stage.
    pub stage: Stage,
    /// A write or locking read the target can serve: its route check may have to be awaited
    /// ([`Statements::bind_check_to_await`]); a read's never is.
    pub routed_write: bool,
}

struct Portal {
    served: Served,
    side: Side,
    /// Served by the target: how legacy describes its columns.
    described: Option<Described>,
    /// A comparison to hold for the shadow at the portal's first Execute.
    job: Option<shadow::Offer>,
}

impl<'s> Statements<'s> {
    pub fn new(
        shared: &'s Shared,
        shadow: Option<&'s Shadow>,
        session_id: u32,
        flow: &'s Flow,
    ) -> Self {
        Self {
            shared,
            classifier: Cache::new(&shared.classifier),
            shadow,
            session_key: format!("session:{session_id}"),
            flow,
            statements: ByName::default(),
            portals: ByName::default(),
            parses: 0,
            ahead: None,
            watched: None,
            frames: Vec::new(),
        }
    }

    /// Whether `t` is the legacy table's in this session: a qualified name always is; a bare
    /// one as the session resolves it (search_path, temporary tables).
    fn resolution(&self, t: &Typed) -> Resolution {
        if t.unqualified {
            self.flow.names()
        } else {
            Resolution::Legacy
        }
    }

    /// A client message of type `tag` is being sent.
    pub fn client_sent(&self, tag: u8) {
        self.flow.client_sent(tag);
    }

    /// The proxy's names question, to send before the client's Query or Parse (`tag`, whole
    /// `body`) when its statement may name the table without a schema and the session's
    /// answer is not known (at its first such statement, and after a statement that may have
    /// changed it — which is recorded here too). Only where something could be routed or
    /// compared.
    #[inline]
    pub fn names_question(&mut self, tag: u8, body: &[u8]) -> Option<Bytes> {
        self.watched = None;
        // Most messages (Execute, Sync, Describe) name no statement text: not a call.
        if !matches!(tag, frontend::QUERY | frontend::PARSE)
            || (self.shared.checks.is_none() && self.shadow.is_none())
        {
            return None;
        }
        self.names_question_for_text(tag, body)
    }

    /// [`Self::names_question`] for a Query or a Parse.
    #[inline(never)]
    fn names_question_for_text(&mut self, tag: u8, body: &[u8]) -> Option<Bytes> {
        let (sql, watched) = match tag {
            frontend::QUERY => (messages::query_text(body)?, false),
            frontend::PARSE => {
                // A statement parsed again as it was (a driver's unnamed one, at each
                // execution) was watched already.
                let (name, sql) = messages::parse_text(body)?;
                let quiet = self.as_before(name, sql).is_some_and(|p| p.names_quiet);
                (sql, quiet)
            }
            _ => return None,
        };
        let classifier = self.classifier.load();
        let quiet = watched || !classifier.names().may_change(sql);
        if tag == frontend::PARSE {
            self.watched = Some(quiet);
        }
        if !quiet {
            self.flow.names_may_change();
            return None;
        }
        (self.flow.names() == Resolution::Unknown
            && classifier.mentions_table(sql)
            && self.flow.ask_names())
        .then(|| classifier.names().question())
    }

    /// The same before a Bind of prepared statement `statement`.
    pub fn names_question_for_bind(&self, statement: &[u8]) -> Option<Bytes> {
        // Known already (the usual case): whatever the statement, nothing to ask.
        if self.flow.names() != Resolution::Unknown {
            return None;
        }
        let source = self.statements.get(statement)?.typed.as_ref()?;
        (self.resolution(source.typed()) == Resolution::Unknown && self.flow.ask_names())
            .then(|| self.shared.classifier.load().names().question())
    }

    /// Waits for the answer to the names question just sent (bounded: then the statement
    /// is served as if the answer were unknown).
    pub async fn await_names(&self) {
        self.flow.names_answered(NAMES_PATIENCE).await;
    }

    /// The live stage of a query type (the rules' when the live state has none).
    fn stage(&self, t: &Typed) -> Stage {
        self.shared.control.stage(&t.query_type).unwrap_or(t.stage)
    }

    /// A prepared statement's live stage: `kept` (the stage and the live state's generation
    /// it was read in) while the live state has not changed since, else read again.
    fn kept_stage(&self, kept: Option<(u64, Stage)>, t: &Typed) -> (u64, Stage) {
        let generation = self.shared.control.generation();
        match kept {
            Some((read, stage)) if read == generation => (read, stage),
            _ => (generation, self.stage(t)),
        }
    }

    /// The side the session's writes go to now: its open transaction's, or, for the first
    /// write of a transaction, the table's (the target once every write type is there).
    fn write_side(&self) -> Side {
        self.flow
            .write_side()
            .unwrap_or(if self.shared.control.writes_to_target() {
                Side::Target
            } else {
                Side::Legacy
            })
    }

    /// Whether executions of `t` in `stage` may be served by the target now (and so its
    /// route check is wanted).
    fn routable_now(&self, t: &Typed, stage: Stage) -> bool {
        if on_write_side(t) {
            self.write_side() == Side::Target
        } else {
            may_route(stage)
        }
    }

    /// A statement served by `side` is being sent: a write or locking read settles its
    /// transaction's write side (the first one decides it).
    fn sent(&self, t: &Typed, side: Side) {
        if side == Side::Target {
            self.flow.target_sent();
        }
        if on_write_side(t) {
            self.flow.write_sent_to(side);
        }
    }

    /// Which side serves an execution of `t` in `stage` whose key is `key` (`None`: the
    /// session's). Writes and locking reads go where the transaction writes (one side per
    /// transaction: docs/routing.md); reads by stage and bucket.
    fn side(&self, t: &Typed, stage: Stage, key: Option<&[u8]>) -> Side {
        if !matches!(t.route, Rewrite::Target(_)) {
            return Side::Legacy;
        }
        if on_write_side(t) {
            return self.write_side();
        }
        // v2 receives this transaction's legacy writes at its COMMIT: until then, legacy.
        if self.flow.unsettled() {
            return Side::Legacy;
        }
        route::decide(stage, key.unwrap_or(self.session_key.as_bytes()))
    }

    /// The route check of a statement: whether the target may serve it now.
    fn checked(&self, key: &str, legacy: &str, target: &str, types: &[u32]) -> Option<Check> {
        self.shared.checks.as_ref()?.get(key, legacy, target, types)
    }

    /// Whether the shadow compares this classification's executions now (before sampling).
    fn compared(&self, t: &Typed, stage: Stage) -> bool {
        self.shadow.is_some()
            && t.read.is_some()
            && matches!(t.route, Rewrite::Target(_))
            && matches!(stage, Stage::Shadow | Stage::Cutover(_) | Stage::Target)
    }

    #[inline]
    fn sampled(t: &Typed) -> bool {
        t.sample_rate >= 1.0 || rand::random::<f64>() < t.sample_rate
    }

    /// The counters of a statement's query type, and its classification when it is on the
    /// legacy table.
    fn classify(&mut self, sql: &[u8]) -> Classified {
        let queries = &self.shared.metrics.queries;
        let passthrough = || Served::either(&queries.passthrough);
        let classifier = self.classifier.load();
        // Most statements: not the table's, looked at no further (no UTF-8 check, no lookup).
        if !classifier.mentions_table(sql) {
            return (passthrough(), None);
        }
        let Ok(sql) = std::str::from_utf8(sql) else {
            // Not UTF-8 (another client_encoding): never parsed, relayed as it is.
            return (passthrough(), None);
        };
        let classification = classifier.classify_mentioning(sql);
        let served = match &*classification {
            Classification::Passthrough => return (passthrough(), None),
            Classification::Unparsable { .. } => {
                return (Served::either(&queries.unparsable), None);
            }
            Classification::Typed(t) if t.named => queries.named(&t.query_type),
            Classification::Typed(t) => {
                // Every automatic type is recorded, whatever its stage, so that operators
                // can see, stage and promote it (once per replica; a set lookup after).
                if let Some(shadow) = self.shadow {
                    shadow.store.fingerprint(&t.query_type, &t.fingerprint.text);
                }
                queries.automatic.clone()
            }
        };
        (served, Some(classification))
    }

    /// The route check a Query (whole `body`) must wait for before it is sent: a write or
    /// locking read whose transaction writes the target, whose check is not in yet. Served by
    /// legacy for want of its check, it would take legacy's locks first where every other
    /// transaction takes v2's (a deadlock), or split its transaction.
    /// The classification made here is kept for the [`Self::inspect`] of the same Query,
    /// which must come next.
    pub fn query_check_to_await(&mut self, body: &[u8]) -> Option<Awaitable> {
        // Nothing waits while the transaction's writes go to legacy (no classifying).
        if self.shared.checks.is_none() || self.write_side() != Side::Target {
            return None;
        }
        let sql = messages::query_text(body)?;
        let classified = self.classify(sql);
        let classification = classified.1.clone();
        self.ahead = Some(classified);
        let classification = classification?;
        let Classification::Typed(t) = &*classification else {
            return None;
        };
        if self.resolution(t) != Resolution::Legacy {
            return None;
        }
        let target = routed_write(t)?;
        let key = self.query_check_key(t);
        self.unchecked(
            key,
            std::str::from_utf8(sql).ok()?.into(),
            target,
            Arc::from([]),
        )
    }

    /// The same for a Bind of prepared statement `statement`.
    pub fn bind_check_to_await(&self, statement: &[u8]) -> Option<Awaitable> {
        if self.shared.checks.is_none() || self.write_side() != Side::Target {
            return None;
        }
        let source = self.statements.get(statement)?.typed.as_ref()?;
        if self.resolution(source.typed()) != Resolution::Legacy {
            return None;
        }
        let target = routed_write(source.typed())?;
        self.unchecked(
            source.check_key().to_owned(),
            Arc::clone(&source.sql),
            target,
            Arc::clone(&source.param_types),
        )
    }

    /// The check to wait for, if it is not in yet.
    fn unchecked(
        &self,
        key: String,
        legacy: Arc<str>,
        target: &str,
        types: Arc<[u32]>,
    ) -> Option<Awaitable> {
        self.checked(&key, &legacy, target, &types)
            .is_none()
            .then(|| Awaitable {
                key,
                legacy,
                target: target.to_owned(),
                types,
            })
    }

    /// A simple Query's route check: per rules and fingerprint (its values are inline).
    fn query_check_key(&mut self, t: &Typed) -> String {
        format!(
            "q:{}:{}",
            self.classifier.load().rules().version,
            t.fingerprint.id
        )
    }

    /// Waits for a check [`Self::query_check_to_await`] or [`Self::bind_check_to_await`] named (bounded: then legacy serves).
    pub async fn await_check(&self, awaitable: Awaitable) {
        if let Some(checks) = &self.shared.checks {
            let waited = checks
                .wait(
                    &awaitable.key,
                    &awaitable.legacy,
                    &awaitable.target,
                    &awaitable.types,
                    CHECK_PATIENCE,
                )
                .await;
            if waited.is_none() {
                tracing::warn!(
                    "a write's route check did not come in time: its transaction stays on legacy"
                );
            }
        }
    }

    /// Forgets what the server did not carry out: a statement whose Parse failed or was
    /// skipped after an error does not exist (a Bind of it is the server's to refuse, with
    /// the client's name), and a target variant whose Parse was skipped is prepared again.
    #[inline]
    pub fn settle(&mut self) {
        if self.flow.parse_outcomes_waiting() {
            self.settle_outcomes();
        }
    }

    #[inline(never)]
    fn settle_outcomes(&mut self) {
        let (lost, confirmed) = self.flow.take_parse_outcomes();
        for seq in lost {
            self.statements.retain(|p| p.parsed != seq);
            for p in self.statements.values_mut() {
                if p.variant_parsed == seq {
                    p.target_ready = false;
                }
            }
        }
        for seq in confirmed {
            for p in self.statements.values_mut() {
                if p.variant_parsed == seq {
                    p.variant_confirmed = true;
                }
            }
        }
    }

    /// Looks at a whole Query, Parse, Execute, Close, Sync or FunctionCall; returns what to
    /// send instead, if anything.
    pub fn inspect(&mut self, tag: u8, body: &[u8]) -> Option<Bytes> {
        self.settle();
        match tag {
            frontend::QUERY => {
                let (replacement, described) = match self.query(body) {
                    Some((frame, described)) => (Some(frame), described),
                    None => (None, None),
                };
                self.flow.expect(Awaited::Query { described });
                return replacement;
            }
            frontend::DESCRIBE => {
                let described = match messages::close_target(body) {
                    Some((b'P', portal)) => {
                        self.portals.get(portal).and_then(|p| p.described.clone())
                    }
                    _ => None,
                };
                self.flow.expect(Awaited::Describe { described });
            }
            frontend::PARSE => {
                self.parses += 1;
                self.flow.expect(Awaited::Parse {
                    injected: false,
                    seq: self.parses,
                });
                return self.parse(body);
            }
            frontend::EXECUTE => {
                let portal = messages::execute_portal(body).unwrap_or_default();
                match self.portals.get_mut(portal) {
                    Some(p) => {
                        p.served.side(p.side).increment(1);
                        if let Some(offer) = p.job.take() {
                            self.flow.defer(offer);
                        }
                    }
                    None => self.shared.metrics.queries.passthrough.increment(1),
                }
            }
            frontend::CLOSE => {
                self.flow.expect(Awaited::Close { injected: false });
                if let Some((kind, name)) = messages::close_target(body) {
                    if kind == b'S' {
                        self.statements.remove(name);
                    } else {
                        self.portals.remove(name);
                    }
                }
            }
            frontend::SYNC => self.flow.expect(Awaited::Sync),
            frontend::FUNCTION_CALL => self.flow.expect(Awaited::Query { described: None }),
            _ => {}
        }
        None
    }

    /// A simple Query: what to send instead, and (served by the target) how legacy
    /// describes its columns.
    #[inline(never)]
    fn query(&mut self, body: &[u8]) -> Option<(Bytes, Option<Described>)> {
        let sql = messages::query_text(body)?;
        // The SQL way to drop prepared statements: a dropped one is no longer routed (its
        // target variant may outlive it; the server refuses a Bind of it).
        match deallocates(sql) {
            Some(None) => self.statements.clear(),
            Some(Some(name)) => {
                self.statements.remove(name.as_slice());
            }
            None => {}
        }
        let (served, classification) = match self.ahead.take() {
            Some(classified) => classified,
            None => self.classify(sql),
        };
        let Some(classification) = classification else {
            served.legacy.increment(1);
            return None;
        };
        let Classification::Typed(t) = &*classification else {
            served.legacy.increment(1);
            return None;
        };
        match self.resolution(t) {
            Resolution::Legacy => {}
            // Another table of that name: not the legacy table's statement at all.
            Resolution::Elsewhere => {
                self.shared.metrics.queries.passthrough.increment(1);
                return None;
            }
            // Perhaps the legacy table's: served by legacy, and its transaction stays there.
            Resolution::Unknown => {
                self.sent(t, Side::Legacy);
                served.legacy.increment(1);
                return t
                    .write_tag
                    .as_deref()
                    .and_then(|tag| messages::tagged_query(body, tag))
                    .map(|frame| (frame, None));
            }
        }
        let stage = self.stage(t);
        let Ok(text) = std::str::from_utf8(sql) else {
            self.sent(t, Side::Legacy);
            return None;
        };
        if self.compared(t, stage)
            && Self::sampled(t)
            && let Some(shadow) = self.shadow
        {
            let classifier = &mut self.classifier;
            let offer = shadow.prepare(&classification, || shadow::Job {
                classification: Arc::clone(&classification),
                sql: text.into(),
                param_types: Arc::new([]),
                bind: Bytes::new(),
                params: Vec::new(),
                inline: true,
                rules: Arc::clone(classifier.load().rules_arc()),
            });
            self.flow.defer(offer);
        }
        let key = match &t.bucket_key {
            BucketKey::Literal(v) => Some(v.as_bytes()),
            _ => None,
        };
        let mut side = self.side(t, stage, key);
        if let Rewrite::Target(target) = &t.route
            && self.routable_now(t, stage)
        {
            // Asked for as soon as the stage may route, whatever this execution's side.
            let check_key = self.query_check_key(t);
            let ready = match self.checked(&check_key, text, target, &[]) {
                Some(Check::Ready { columns, .. }) => Some(described(&columns)),
                _ => None,
            };
            if side == Side::Target
                && let Some(columns) = ready
            {
                served.target.increment(1);
                self.sent(t, Side::Target);
                let tag = t.write_tag.as_deref().unwrap_or("");
                let frame = messages::query_frame(&format!("{target}{tag}"));
                return Some((frame, Some(columns)));
            }
        }
        if side == Side::Target {
            side = Side::Legacy;
        }
        self.sent(t, side);
        served.side(side).increment(1);
        t.write_tag
            .as_deref()
            .and_then(|tag| messages::tagged_query(body, tag))
            .map(|frame| (frame, None))
    }

    #[inline(never)]
    fn parse(&mut self, body: &[u8]) -> Option<Bytes> {
        let message = messages::ParseMessage::read(body)?;
        let (name, sql) = (message.name, message.sql);
        let names_quiet = self.watched.take() == Some(true);
        let (served, typed, stage) = match self.parsed_again(&message) {
            Some(again) => again,
            None => {
                let (served, classification) = self.classify(sql);
                let typed = classification.as_ref().and_then(|c| {
                    let Classification::Typed(_) = &**c else {
                        return None;
                    };
                    Some(Arc::new(Source {
                        classification: Arc::clone(c),
                        sql: std::str::from_utf8(sql).ok()?.into(),
                        param_types: message.param_types()?.into(),
                        rules: Arc::clone(self.classifier.load().rules_arc()),
                        check_key: std::sync::OnceLock::new(),
                    }))
                });
                (served, typed, None)
            }
        };
        let stage = typed
            .as_ref()
            .map(|source| self.kept_stage(stage, source.typed()));
        if let (Some(source), Some((_, stage))) = (&typed, stage) {
            let t = source.typed();
            if let Rewrite::Target(target) = &t.route
                && self.resolution(t) == Resolution::Legacy
                && self.routable_now(t, stage)
            {
                // Asked for now, so that it is in by the first Bind.
                let _ = self.checked(source.check_key(), &source.sql, target, &source.param_types);
            }
        }
        let write_tag = typed.as_ref().and_then(|s| s.typed().write_tag.clone());
        self.statements.insert(
            name,
            Prepared {
                served,
                typed,
                target_ready: false,
                parsed: self.parses,
                variant_parsed: 0,
                variant_confirmed: false,
                variant_batch: 0,
                variant: None,
                stage,
                names_quiet,
            },
        );
        write_tag.and_then(|tag| messages::tagged_parse(body, &tag))
    }

    /// What the statement `parse` names was classified as, when this Parse prepares it
    /// again as it was (same text, same declared types), under the same rules: a driver's
    /// unnamed statement, parsed again at each execution (a lookup, a copy of its text and
    /// its types, and the old copy freed, ~2k instructions, otherwise).
    fn parsed_again(&mut self, parse: &messages::ParseMessage<'_>) -> Option<Reparsed> {
        let prepared = self.as_before(parse.name, parse.sql)?;
        let source = prepared.typed.as_ref()?;
        parse.param_types_are(&source.param_types).then(|| {
            (
                prepared.served.clone(),
                Some(Arc::clone(source)),
                prepared.stage,
            )
        })
    }

    /// Statement `name`, when it is on the legacy table with the text `sql`, classified under
    /// the rules in force: what a Parse of the same text under that name would find again.
    fn as_before(&mut self, name: &[u8], sql: &[u8]) -> Option<&Prepared> {
        let rules = Arc::as_ptr(self.classifier.load().rules_arc());
        self.statements.get(name).filter(|p| {
            p.typed.as_ref().is_some_and(|source| {
                source.sql.as_bytes() == sql && std::ptr::eq(Arc::as_ptr(&source.rules), rules)
            })
        })
    }

    /// Whether a Bind of prepared statement `name` must be read whole: its executions may be
    /// routed to the target now, or compared. What the Bind needs to know next, when it
    /// does (so that it does not look the statement up again).
    pub fn bind_needs_whole(&mut self, name: &[u8]) -> Option<Whole> {
        let prepared = self.statements.get(name)?;
        let t = prepared.typed.as_ref()?.typed();
        let kept = self.kept_stage(prepared.stage, t);
        let stage = kept.1;
        let whole = self.resolution(t) == Resolution::Legacy
            && ((matches!(t.route, Rewrite::Target(_)) && self.routable_now(t, stage))
                || self.compared(t, stage));
        let routed_write = routed_write(t).is_some();
        if prepared.stage != Some(kept)
            && let Some(prepared) = self.statements.get_mut(name)
        {
            prepared.stage = Some(kept);
        }
        whole.then_some(Whole {
            stage,
            routed_write,
        })
    }

    /// A Bind: its portal executes what `statement` was parsed as, on the side its key
    /// decides. `whole` is the whole message and the stage when
    /// [`Self::bind_needs_whole`] said so. Returns what to send instead of the Bind's
    /// first bytes, up to and including its statement's name, if anything: the rest of the
    /// Bind (its formats and values) goes on as sent, after it.
    pub fn bind(
        &mut self,
        portal: &[u8],
        statement: &[u8],
        whole: Option<(&[u8], Stage)>,
    ) -> Option<&[u8]> {
        let Some(prepared) = self.statements.get(statement) else {
            self.portals.insert(
                portal,
                Portal {
                    served: Served::either(&self.shared.metrics.queries.passthrough),
                    side: Side::Legacy,
                    described: None,
                    job: None,
                },
            );
            return None;
        };
        let served = prepared.served.clone();
        let (Some(source), Some((body, stage))) = (prepared.typed.clone(), whole) else {
            if let Some(source) = &prepared.typed {
                self.sent(source.typed(), Side::Legacy);
            }
            self.portals.insert(
                portal,
                Portal {
                    served,
                    side: Side::Legacy,
                    described: None,
                    job: None,
                },
            );
            return None;
        };
        let t = source.typed();
        // The parameters are read only when something needs them: the shadow's copy, or the
        // bucket's key (which only `cutover N%` splits by).
        let job = match self.shadow {
            Some(shadow) if self.compared(t, stage) && Self::sampled(t) => {
                Some(shadow.prepare(&source.classification, || Self::job(&source, body)))
            }
            _ => None,
        };
        let key = match (&t.bucket_key, stage) {
            (BucketKey::Param(n), Stage::Cutover(_)) => messages::bind_param(body, n - 1)
                .and_then(|(binary, value)| Some(route::key_text(binary, value?))),
            (BucketKey::Literal(v), _) => Some(route::KeyText::Sent(v.as_bytes())),
            _ => None,
        };
        let wanted = self.side(t, stage, key.as_deref());
        // Routed to the target: the frames in `self.frames`, and how legacy describes the
        // portal's columns.
        let described = match (wanted, &t.route) {
            (Side::Target, Rewrite::Target(target)) if !self.flow.routing_broken() => {
                self.bind_to_target(statement, &source, target, portal, body)
            }
            _ => None,
        };
        let side = if described.is_some() {
            Side::Target
        } else {
            Side::Legacy
        };
        self.sent(t, side);
        self.portals.insert(
            portal,
            Portal {
                served,
                side,
                described,
                job,
            },
        );
        (side == Side::Target).then_some(&self.frames[..])
    }

    /// The shadow's copy of an execution: the statement and the Bind (`body`), copied in
    /// one piece; the shadow's worker reads the values out of it.
    fn job(source: &Source, body: &[u8]) -> shadow::Job {
        shadow::Job {
            classification: Arc::clone(&source.classification),
            sql: Arc::clone(&source.sql),
            param_types: Arc::clone(&source.param_types),
            bind: Bytes::copy_from_slice(body),
            params: Vec::new(),
            inline: false,
            rules: Arc::clone(&source.rules),
        }
    }

    /// The start of the Bind rewritten to name the statement's target variant (its header,
    /// portal and the variant's name; its formats and values follow as the client sent
    /// them), preceded (the first time) by the Close and Parse that prepare it, written in
    /// `frames`; `None` while the route check has not said yes. Returns the columns its
    /// portal describes.
    fn bind_to_target(
        &mut self,
        statement: &[u8],
        source: &Source,
        target: &str,
        portal: &[u8],
        body: &[u8],
    ) -> Option<Described> {
        let checks = self.shared.checks.as_ref()?;
        let generation = checks.generation();
        let prepared = self.statements.get_mut(statement)?;
        if prepared
            .variant
            .as_ref()
            .is_none_or(|v| v.generation != generation)
        {
            let ready =
                match checks.get(source.check_key(), &source.sql, target, &source.param_types)? {
                    Check::Ready {
                        param_types,
                        columns,
                    } => Some(ReadyVariant {
                        name: format!("{TARGET_PREFIX}{}", hex::encode(statement))
                            .into_bytes()
                            .into_boxed_slice(),
                        param_types,
                        described: described(&columns),
                    }),
                    Check::Refused(_) => None,
                };
            prepared.variant = Some(Variant { generation, ready });
        }
        let ReadyVariant {
            name: variant,
            param_types,
            described,
        } = prepared.variant.as_ref()?.ready.as_ref()?;
        // Bind: portal, the variant's name, then the client's formats and values as sent
        // (left where they are in the read: only what comes before them is written here).
        let rest = body.len() - (portal.len() + 1 + statement.len() + 1);
        let bind_len = u32::try_from(4 + portal.len() + 1 + variant.len() + 1 + rest).ok()?;
        let out = &mut self.frames;
        if out.capacity() > FRAMES_KEPT {
            // What a Parse of a long target SQL left.
            *out = Vec::new();
        }
        out.clear();
        // Prepared (again) unless done, or sent in this batch (a failure there skips this
        // Bind too): a Parse from an earlier batch may have been skipped by an error whose
        // answer is not in yet.
        let batch = self.flow.batches_sent();
        if !prepared.target_ready || (!prepared.variant_confirmed && batch > prepared.variant_batch)
        {
            self.parses += 1;
            prepared.target_ready = true;
            prepared.variant_parsed = self.parses;
            prepared.variant_confirmed = false;
            prepared.variant_batch = batch;
            let tag = source.typed().write_tag.as_deref().unwrap_or("");
            out.extend_from_slice(&messages::close_statement_frame(variant));
            out.extend_from_slice(&messages::parse_frame(
                variant,
                &format!("{target}{tag}"),
                param_types,
            ));
            self.flow.expect(Awaited::Close { injected: true });
            self.flow.expect(Awaited::Parse {
                injected: true,
                seq: self.parses,
            });
        }
        out.reserve(5 + portal.len() + variant.len() + 2);
        out.put_u8(frontend::BIND);
        out.put_u32(bind_len);
        out.put_slice(portal);
        out.put_u8(0);
        out.put_slice(variant);
        out.put_u8(0);
        Some(Arc::clone(described))
    }
}
