//! The console's language: a few words, read by a tokenizer of its own (the commands are not
//! SQL, so the SQL parser has nothing to offer). Values are single-quoted strings ('' for a
//! quote), bare words or numbers; `$n` stands for the n-th parameter of an extended-protocol
//! statement and is filled in, as a quoted value, before the command is read.

use std::fmt;

use pgwire::api::Type;

/// One piece of a command.
#[derive(Debug, Clone, PartialEq)]
pub enum Token {
    /// A bare word (compared without regard to case).
    Word(String),
    /// A single-quoted string, unquoted.
    Quoted(String),
    /// `$n` (1-based).
    Param(usize),
}

impl Token {
    /// The token as a value: a word or a quoted string.
    fn value(&self) -> Option<&str> {
        match self {
            Token::Word(w) | Token::Quoted(w) => Some(w),
            Token::Param(_) => None,
        }
    }

    fn is(&self, word: &str) -> bool {
        matches!(self, Token::Word(w) if w.eq_ignore_ascii_case(word))
    }
}

/// A syntax error, with what the command should have looked like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Syntax(pub String);

impl fmt::Display for Syntax {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Splits a query string into its statements (on `;` outside quotes), each tokenized. Empty
/// statements are dropped.
pub fn statements(text: &str) -> Result<Vec<Vec<Token>>, Syntax> {
    let mut out = Vec::new();
    let mut current = Vec::new();
    let mut chars = text.char_indices().peekable();
    while let Some(&(start, c)) = chars.peek() {
        match c {
            ';' => {
                chars.next();
                if !current.is_empty() {
                    out.push(std::mem::take(&mut current));
                }
            }
            c if c.is_whitespace() => {
                chars.next();
            }
            '\'' => {
                chars.next();
                let mut value = String::new();
                loop {
                    match chars.next() {
                        Some((_, '\'')) if chars.peek().map(|&(_, c)| c) == Some('\'') => {
                            chars.next();
                            value.push('\'');
                        }
                        Some((_, '\'')) => break,
                        Some((_, c)) => value.push(c),
                        None => {
                            return Err(Syntax(
                                "a quoted value is not closed (a quote inside is written '')"
                                    .into(),
                            ));
                        }
                    }
                }
                current.push(Token::Quoted(value));
            }
            '$' => {
                chars.next();
                let mut digits = String::new();
                while let Some(&(_, d)) = chars.peek().filter(|(_, d)| d.is_ascii_digit()) {
                    digits.push(d);
                    chars.next();
                }
                match digits.parse::<usize>() {
                    Ok(n) if n >= 1 => current.push(Token::Param(n)),
                    _ => return Err(Syntax(format!("unexpected '$' at character {}", start + 1))),
                }
            }
            _ => {
                let mut word = String::new();
                while let Some(&(_, c)) = chars
                    .peek()
                    .filter(|(_, c)| !c.is_whitespace() && !matches!(c, ';' | '\''))
                {
                    word.push(c);
                    chars.next();
                }
                current.push(Token::Word(word));
            }
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    Ok(out)
}

/// The highest `$n` in a statement.
pub fn parameters(tokens: &[Token]) -> usize {
    tokens
        .iter()
        .filter_map(|t| match t {
            Token::Param(n) => Some(*n),
            _ => None,
        })
        .max()
        .unwrap_or(0)
}

/// Replaces each `$n` by its value (a quoted string); a NULL parameter is refused.
pub fn bind(tokens: &[Token], values: &[Option<String>]) -> Result<Vec<Token>, Syntax> {
    tokens
        .iter()
        .map(|t| match t {
            Token::Param(n) => match values.get(n - 1) {
                Some(Some(v)) => Ok(Token::Quoted(v.clone())),
                Some(None) => Err(Syntax(format!("parameter ${n} is NULL"))),
                None => Err(Syntax(format!("there is no parameter ${n}"))),
            },
            other => Ok(other.clone()),
        })
        .collect()
}

/// What an operator (or a driver on their behalf) can say.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Help,
    Version,
    QueryTypes,
    History,
    Clients,
    Stats,
    Config,
    Changes,
    Marks,
    SetStage {
        query_type: String,
        stage: String,
        percent: Option<i64>,
        reason: String,
        force: bool,
    },
    Accept {
        change: String,
        reason: String,
    },
    /// A class of divergence reviewers expect (as `cutover ctl mark`).
    Mark {
        query_type: String,
        kind: String,
        columns: Vec<String>,
        class: String,
        note: String,
    },
    Reload,
    Pause,
    Resume,
    /// What drivers and pools send on their own: accepted, changing nothing.
    Begin,
    Commit,
    Rollback,
    /// `SET name ...`, `RESET ...`, `DISCARD ...`: the tag to answer.
    SessionSetting(&'static str),
    /// `SELECT 1` (a pool's health check).
    SelectOne,
    /// `SELECT version()`.
    SelectVersion,
    /// `SHOW setting` of one of [`SETTINGS`] (by its index), as drivers and GUI tools ask.
    Setting(usize),
}

/// The settings a driver or a GUI tool may ask for with `SHOW`: the name, the answer's one
/// column (named as PostgreSQL names it), the value.
/// An answer's columns: (name, type).
pub type Columns = &'static [(&'static str, Type)];

pub const SETTINGS: [(&str, Columns, &str); 9] = [
    ("server_version", &[("server_version", Type::TEXT)], "15.0"),
    (
        "server_encoding",
        &[("server_encoding", Type::TEXT)],
        "UTF8",
    ),
    (
        "client_encoding",
        &[("client_encoding", Type::TEXT)],
        "UTF8",
    ),
    ("DateStyle", &[("DateStyle", Type::TEXT)], "ISO, MDY"),
    ("TimeZone", &[("TimeZone", Type::TEXT)], "Etc/UTC"),
    (
        "standard_conforming_strings",
        &[("standard_conforming_strings", Type::TEXT)],
        "on",
    ),
    (
        "integer_datetimes",
        &[("integer_datetimes", Type::TEXT)],
        "on",
    ),
    (
        "transaction_isolation",
        &[("transaction_isolation", Type::TEXT)],
        "read committed",
    ),
    (
        "default_transaction_read_only",
        &[("default_transaction_read_only", Type::TEXT)],
        "off",
    ),
];

/// One line per command, for `SHOW HELP` and for the error on an unknown command.
pub const HELP: [(&str, &str); 16] = [
    ("SHOW HELP", "this list"),
    ("SHOW VERSION", "cutover's version"),
    (
        "SHOW QUERY_TYPES",
        "every query type: stage, percent, dual-write mode, where the state comes from",
    ),
    (
        "SHOW STATS",
        "per query type since this process started: statements served by each side, comparisons by outcome, each side's latency (p50, p99) as the shadow measured it",
    ),
    (
        "SHOW CLIENTS",
        "every session of this replica: user, database, application, address, TLS, state",
    ),
    (
        "SHOW CONFIG",
        "every setting in effect, and whether a RELOAD applies a change to it",
    ),
    ("SHOW HISTORY", "the latest stage changes, newest first"),
    (
        "SHOW CHANGES",
        "the behaviour changes the rules declare: seen how often, accepted by whom",
    ),
    (
        "SHOW MARKS",
        "the divergence classes reviewers marked as expected",
    ),
    (
        "SET STAGE query_type stage [percent] REASON 'why' [FORCE]",
        "move a query type, through the same gate and audit as the API and cutover ctl",
    ),
    (
        "ACCEPT change REASON 'why'",
        "a reviewer accepts a declared behaviour change",
    ),
    (
        "MARK query_type KIND kind COLUMNS column[,column…] CLASS class NOTE 'why'",
        "a class of divergence is expected (kind: drift, rewrite_bug, error, undetermined): counted apart from the confirmed ones, as cutover ctl mark",
    ),
    (
        "RELOAD",
        "read the configuration file and the rules again, as SIGHUP does",
    ),
    (
        "PAUSE",
        "hold every session's next transaction (work in flight finishes); returns once no session is inside a transaction",
    ),
    ("RESUME", "release the sessions PAUSE holds"),
    (
        "BEGIN / COMMIT / ROLLBACK / SET / RESET / DISCARD / SELECT 1 / SELECT version() / SHOW setting",
        "accepted for drivers and pools; the console has no transactions: every command takes effect at once",
    ),
];

/// The index in [`SETTINGS`] of a setting, named without regard to case.
fn setting(name: &str) -> Option<usize> {
    SETTINGS
        .iter()
        .position(|(s, _, _)| s.eq_ignore_ascii_case(name))
}

fn usage(command: &str) -> Syntax {
    let line = HELP
        .iter()
        .find(|(c, _)| c.starts_with(command))
        .map_or(command, |(c, _)| c);
    Syntax(format!("usage: {line}"))
}

/// The words of the commands, for the error on an unknown one.
pub fn known() -> String {
    HELP.iter().map(|(c, _)| *c).collect::<Vec<_>>().join("; ")
}

impl Command {
    /// Reads one statement (its parameters bound).
    pub fn parse(tokens: &[Token]) -> Result<Command, Syntax> {
        let word = |i: usize| {
            tokens.get(i).and_then(|t| match t {
                Token::Word(w) => Some(w.to_ascii_uppercase()),
                _ => None,
            })
        };
        let first = word(0).unwrap_or_default();
        let second = word(1).unwrap_or_default();
        let only = |n: usize, command: Command, shape: &str| {
            if tokens.len() == n {
                Ok(command)
            } else {
                Err(usage(shape))
            }
        };
        match (first.as_str(), second.as_str()) {
            ("SHOW", "HELP") => only(2, Command::Help, "SHOW HELP"),
            ("SHOW", "VERSION") => only(2, Command::Version, "SHOW VERSION"),
            ("SHOW", "QUERY_TYPES" | "STAGES") => only(2, Command::QueryTypes, "SHOW QUERY_TYPES"),
            ("SHOW", "STATS") => only(2, Command::Stats, "SHOW STATS"),
            ("SHOW", "CLIENTS") => only(2, Command::Clients, "SHOW CLIENTS"),
            ("SHOW", "CONFIG") => only(2, Command::Config, "SHOW CONFIG"),
            ("SHOW", "HISTORY") => only(2, Command::History, "SHOW HISTORY"),
            ("SHOW", "CHANGES") => only(2, Command::Changes, "SHOW CHANGES"),
            ("SHOW", "MARKS") => only(2, Command::Marks, "SHOW MARKS"),
            // `SHOW TRANSACTION ISOLATION LEVEL`, as JDBC asks.
            ("SHOW", "TRANSACTION") if tokens.len() == 4 => {
                Ok(Command::Setting(setting("transaction_isolation").unwrap_or_default()))
            }
            ("SHOW", name) if tokens.len() == 2 => setting(name)
                .map(Command::Setting)
                .ok_or_else(|| {
                    Syntax(format!(
                        "the cutover console does not know this command or setting (\"{}\"); it knows: {}",
                        name.to_ascii_lowercase(),
                        known()
                    ))
                }),
            ("SET", "STAGE") => set_stage(&tokens[2..]),
            ("SET" | "RESET", _) if tokens.len() >= 2 => {
                Ok(Command::SessionSetting(if first == "SET" {
                    "SET"
                } else {
                    "RESET"
                }))
            }
            ("DISCARD", "ALL") => only(2, Command::SessionSetting("DISCARD ALL"), "DISCARD ALL"),
            ("ACCEPT", _) => accept(&tokens[1..]),
            ("MARK", _) => mark(&tokens[1..]),
            ("RELOAD", _) => only(1, Command::Reload, "RELOAD"),
            ("PAUSE", _) => only(1, Command::Pause, "PAUSE"),
            ("RESUME", _) => only(1, Command::Resume, "RESUME"),
            ("BEGIN" | "START", _) => Ok(Command::Begin),
            ("COMMIT" | "END", _) => Ok(Command::Commit),
            ("ROLLBACK" | "ABORT", _) => Ok(Command::Rollback),
            ("SELECT", "1") => only(2, Command::SelectOne, "SELECT 1"),
            ("SELECT", "VERSION()") => only(2, Command::SelectVersion, "SELECT version()"),
            _ => Err(Syntax(format!(
                "the cutover console does not know this command; it knows: {}",
                known()
            ))),
        }
    }

    /// The columns a command answers with (none: it answers with a command tag only).
    pub fn columns(&self) -> Columns {
        const TEXT: Type = Type::TEXT;
        const INT: Type = Type::INT8;
        const FLOAT: Type = Type::FLOAT8;
        const BOOL: Type = Type::BOOL;
        match self {
            Command::Help => &[("command", TEXT), ("does", TEXT)],
            Command::Version => &[("version", TEXT)],
            Command::QueryTypes => &[
                ("query_type", TEXT),
                ("stage", TEXT),
                ("percent", INT),
                ("dual_write", TEXT),
                ("source", TEXT),
                ("updated_at", TEXT),
            ],
            Command::Stats => &[
                ("query_type", TEXT),
                ("served_legacy", INT),
                ("served_target", INT),
                ("match", INT),
                ("diverged", INT),
                ("error", INT),
                ("expected", INT),
                ("transient", INT),
                ("nondeterministic", INT),
                ("skipped", INT),
                ("legacy_p50_ms", FLOAT),
                ("legacy_p99_ms", FLOAT),
                ("target_p50_ms", FLOAT),
                ("target_p99_ms", FLOAT),
            ],
            Command::Clients => &[
                ("id", INT),
                ("type", TEXT),
                ("user", TEXT),
                ("database", TEXT),
                ("application_name", TEXT),
                ("address", TEXT),
                ("tls", BOOL),
                ("state", TEXT),
                ("state_since", TEXT),
                ("connected_at", TEXT),
                ("batches", INT),
            ],
            Command::Config => &[("key", TEXT), ("value", TEXT), ("reload", TEXT)],
            Command::History => &[
                ("changed_at", TEXT),
                ("query_type", TEXT),
                ("from", TEXT),
                ("to", TEXT),
                ("changed_by", TEXT),
                ("via", TEXT),
                ("reason", TEXT),
                ("forced", BOOL),
            ],
            Command::Changes => &[
                ("change", TEXT),
                ("kind", TEXT),
                ("query_types", TEXT),
                ("observed", INT),
                ("accepted_by", TEXT),
                ("accepted_at", TEXT),
                ("reason", TEXT),
            ],
            Command::Marks => &[
                ("query_type", TEXT),
                ("kind", TEXT),
                ("columns", TEXT),
                ("class", TEXT),
                ("note", TEXT),
                ("marked_by", TEXT),
                ("marked_at", TEXT),
            ],
            Command::Reload => &[("reloaded", TEXT), ("outcome", TEXT)],
            Command::SelectOne => &[("?column?", Type::INT4)],
            Command::SelectVersion => &[("version", TEXT)],
            Command::Setting(i) => SETTINGS[*i].1,
            Command::SetStage { .. }
            | Command::Accept { .. }
            | Command::Mark { .. }
            | Command::Pause
            | Command::Resume
            | Command::Begin
            | Command::Commit
            | Command::Rollback
            | Command::SessionSetting(_) => &[],
        }
    }

    /// Whether the command changes the migration (then counted for the ROLLBACK notice).
    pub fn changes_state(&self) -> bool {
        matches!(
            self,
            Command::SetStage { .. }
                | Command::Accept { .. }
                | Command::Mark { .. }
                | Command::Reload
                | Command::Pause
                | Command::Resume
        )
    }
}

/// `REASON 'why'` at the end of `tokens`: (what comes before it, the reason).
fn reason(tokens: &[Token]) -> Option<(&[Token], String)> {
    let at = tokens.iter().position(|t| t.is("REASON"))?;
    let why = tokens.get(at + 1)?.value()?;
    if why.trim().is_empty() {
        return None;
    }
    Some((&tokens[..at], why.to_owned()))
}

/// `query_type stage [percent] REASON 'why' [FORCE]`.
fn set_stage(tokens: &[Token]) -> Result<Command, Syntax> {
    let shape = "SET STAGE";
    let (tokens, force) = match tokens.split_last() {
        Some((last, rest)) if last.is("FORCE") => (rest, true),
        _ => (tokens, false),
    };
    let at = tokens
        .iter()
        .position(|t| t.is("REASON"))
        .ok_or_else(|| usage(shape))?;
    if at + 2 != tokens.len() {
        return Err(match tokens.get(at + 2) {
            Some(extra) => Syntax(format!(
                "unexpected {:?} after the reason; {}",
                extra.value().unwrap_or("$n"),
                usage(shape)
            )),
            None => usage(shape),
        });
    }
    let (head, why) = reason(tokens).ok_or_else(|| usage(shape))?;
    if !matches!(tokens.get(at + 1), Some(Token::Quoted(_))) {
        return Err(Syntax(format!(
            "the reason is a quoted string; {}",
            usage(shape)
        )));
    }
    let value = |t: &Token| t.value().map(str::to_owned).ok_or_else(|| usage(shape));
    let (query_type, stage, percent) = match head {
        [qt, stage] => (value(qt)?, value(stage)?, None),
        [qt, stage, percent] => {
            let p = value(percent)?;
            let n = p
                .parse::<i64>()
                .map_err(|_| Syntax(format!("percent {p:?} is not a number")))?;
            (value(qt)?, value(stage)?, Some(n))
        }
        _ => return Err(usage(shape)),
    };
    Ok(Command::SetStage {
        query_type: query_type.to_ascii_lowercase(),
        stage: stage.to_ascii_lowercase(),
        percent,
        reason: why,
        force,
    })
}

/// `query_type KIND kind COLUMNS a[,b…] CLASS class NOTE 'why'` (the keywords in any order
/// after the query type; columns as one word `a,b`, several words, or a quoted list).
fn mark(tokens: &[Token]) -> Result<Command, Syntax> {
    const KEYWORDS: [&str; 4] = ["KIND", "COLUMNS", "CLASS", "NOTE"];
    let shape = "MARK";
    let (query_type, rest) = tokens.split_first().ok_or_else(|| usage(shape))?;
    let query_type = query_type.value().ok_or_else(|| usage(shape))?;
    let mut values: [Option<Vec<&Token>>; 4] = Default::default();
    let mut current: Option<usize> = None;
    for token in rest {
        match KEYWORDS.iter().position(|k| token.is(k)) {
            Some(k) if values[k].is_none() => {
                values[k] = Some(Vec::new());
                current = Some(k);
            }
            Some(k) => {
                return Err(Syntax(format!(
                    "{} is given twice; {}",
                    KEYWORDS[k],
                    usage(shape)
                )));
            }
            None => match current {
                Some(k) => values[k].get_or_insert_with(Vec::new).push(token),
                None => return Err(usage(shape)),
            },
        }
    }
    let [Some(kind), Some(columns), Some(class), Some(note)] = values else {
        return Err(usage(shape));
    };
    let single = |v: &[&Token], what: &str| match v {
        [t] => t.value().map(str::to_owned).ok_or_else(|| usage(shape)),
        _ => Err(Syntax(format!("{what} takes one value; {}", usage(shape)))),
    };
    if !matches!(note.as_slice(), [Token::Quoted(_)]) {
        return Err(Syntax(format!(
            "the note is a quoted string; {}",
            usage(shape)
        )));
    }
    let columns: Vec<String> = columns
        .iter()
        .filter_map(|t| t.value())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(str::to_owned)
        .collect();
    Ok(Command::Mark {
        query_type: query_type.to_ascii_lowercase(),
        kind: single(&kind, "KIND")?.to_ascii_lowercase(),
        columns,
        class: single(&class, "CLASS")?,
        note: single(&note, "NOTE")?,
    })
}

/// `change REASON 'why'`.
fn accept(tokens: &[Token]) -> Result<Command, Syntax> {
    match reason(tokens) {
        Some(([change], why)) if tokens.len() == 3 => Ok(Command::Accept {
            change: change.value().ok_or_else(|| usage("ACCEPT"))?.to_owned(),
            reason: why,
        }),
        _ => Err(usage("ACCEPT")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(text: &str) -> Result<Command, Syntax> {
        let mut all = statements(text)?;
        assert_eq!(all.len(), 1, "{text}");
        Command::parse(&all.remove(0))
    }

    #[test]
    fn set_stage_commands_parse() {
        assert_eq!(
            one("SET STAGE record_deposit cutover 10 REASON 'it''s time; really' FORCE;").unwrap(),
            Command::SetStage {
                query_type: "record_deposit".into(),
                stage: "cutover".into(),
                percent: Some(10),
                reason: "it's time; really".into(),
                force: true
            }
        );
        assert_eq!(
            one("set stage Set_Status shadow reason 'compare'").unwrap(),
            Command::SetStage {
                query_type: "set_status".into(),
                stage: "shadow".into(),
                percent: None,
                reason: "compare".into(),
                force: false
            }
        );
        for bad in [
            "SET STAGE x shadow",
            "SET STAGE x shadow REASON why",
            "SET STAGE x shadow REASON ''",
            "SET STAGE x cutover ten REASON 'x'",
            "SET STAGE x shadow REASON 'x' NOW",
            "SET STAGE shadow REASON 'x'",
        ] {
            assert!(one(bad).is_err(), "{bad}");
        }
        assert!(statements("SET STAGE x shadow REASON 'open").is_err());
    }

    #[test]
    fn parameters_are_bound_as_quoted_values() {
        let tokens = statements("SET STAGE $1 cutover $2 REASON $3")
            .unwrap()
            .remove(0);
        assert_eq!(parameters(&tokens), 3);
        let bound = bind(
            &tokens,
            &[
                Some("top_referrers".into()),
                Some("25".into()),
                Some("it's 'quoted'".into()),
            ],
        )
        .unwrap();
        assert_eq!(
            Command::parse(&bound).unwrap(),
            Command::SetStage {
                query_type: "top_referrers".into(),
                stage: "cutover".into(),
                percent: Some(25),
                reason: "it's 'quoted'".into(),
                force: false
            }
        );
        assert!(bind(&tokens, &[None, None, None]).is_err());
        assert!(bind(&tokens, &[Some("a".into())]).is_err());
    }

    #[test]
    fn several_statements_and_driver_chatter() {
        let all = statements("SHOW STATS; ;SHOW CLIENTS;").unwrap();
        let commands: Vec<_> = all.iter().map(|t| Command::parse(t).unwrap()).collect();
        assert_eq!(commands, [Command::Stats, Command::Clients]);
        for (text, expected) in [
            ("BEGIN", Command::Begin),
            (
                "start transaction isolation level serializable",
                Command::Begin,
            ),
            ("COMMIT", Command::Commit),
            ("rollback", Command::Rollback),
            ("SET extra_float_digits = 3", Command::SessionSetting("SET")),
            (
                "SET application_name = 'PostgreSQL JDBC Driver'",
                Command::SessionSetting("SET"),
            ),
            ("DISCARD ALL", Command::SessionSetting("DISCARD ALL")),
            ("select 1", Command::SelectOne),
            ("SELECT version();", Command::SelectVersion),
            (
                "show transaction isolation level",
                Command::Setting(setting("transaction_isolation").unwrap()),
            ),
            (
                "SHOW datestyle",
                Command::Setting(setting("DateStyle").unwrap()),
            ),
            (
                "MARK top_referrers KIND drift COLUMNS level_1_referrals, x CLASS counter_drift NOTE 'legacy drifted'",
                Command::Mark {
                    query_type: "top_referrers".into(),
                    kind: "drift".into(),
                    columns: vec!["level_1_referrals".into(), "x".into()],
                    class: "counter_drift".into(),
                    note: "legacy drifted".into(),
                },
            ),
            (
                "mark t note 'n' class c columns 'a,b' kind error",
                Command::Mark {
                    query_type: "t".into(),
                    kind: "error".into(),
                    columns: vec!["a".into(), "b".into()],
                    class: "c".into(),
                    note: "n".into(),
                },
            ),
            (
                "ACCEPT cycles_refused REASON 'v2 is right'",
                Command::Accept {
                    change: "cycles_refused".into(),
                    reason: "v2 is right".into(),
                },
            ),
        ] {
            assert_eq!(one(text).unwrap(), expected, "{text}");
        }
        for bad in [
            "MARK",
            "MARK t KIND drift COLUMNS a CLASS c",
            "MARK t KIND drift COLUMNS a CLASS c NOTE unquoted",
            "MARK t KIND drift KIND error COLUMNS a CLASS c NOTE 'n'",
            "MARK t stray KIND drift COLUMNS a CLASS c NOTE 'n'",
            "PAUSE now",
            "SHOW STATS please",
            "SHOW work_mem",
            "DROP TABLE x",
        ] {
            assert!(one(bad).is_err(), "{bad}");
        }
        assert!(one("DROP TABLE x").unwrap_err().0.contains("SHOW HELP"));
    }
}
