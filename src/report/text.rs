//! The report's words, in English and in Brazilian Portuguese (the customer's team writes
//! Portuguese). Data (query type names, SQL, reasons) is shown as stored.

/// The report's language.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    En,
    PtBr,
}

impl std::str::FromStr for Lang {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "en" | "en-us" | "en-gb" => Ok(Lang::En),
            "pt-br" | "pt" => Ok(Lang::PtBr),
            other => Err(format!("language {other:?}: en or pt-BR")),
        }
    }
}

pub struct Text {
    pub lang: &'static str,
    pub title: &'static str,
    pub window: &'static str,
    pub generated: &'static str,
    pub overall: &'static str,
    pub success_rate: &'static str,
    pub improvement: &'static str,
    pub slower_plans: &'static str,
    pub samples: &'static str,
    pub write_divergences: &'static str,
    pub pending_repair: &'static str,
    pub repaired: &'static str,
    pub backfill: &'static str,
    pub last_verify: &'static str,
    pub clean: &'static str,
    pub drift: &'static str,
    pub none: &'static str,
    /// A completed backfill that copied nothing (the tables were level already).
    pub nothing_to_copy: &'static str,
    /// "rows", after a count.
    pub rows: &'static str,
    /// A row one side does not have.
    pub absent: &'static str,
    /// Column heads of the differing rows, and the word before an error.
    pub key: &'static str,
    pub column: &'static str,
    pub error: &'static str,
    /// The column cell of a whole row present on one side only.
    pub whole_row: &'static str,
    pub query_types: &'static str,
    pub query_type: &'static str,
    pub stage: &'static str,
    pub match_rate: &'static str,
    pub verdict: &'static str,
    pub ready_for: &'static str,
    pub not_ready_for: &'static str,
    pub needs: &'static str,
    pub final_stage: &'static str,
    pub outcomes: &'static str,
    pub outcome: &'static str,
    pub count: &'static str,
    pub latency: &'static str,
    pub side: &'static str,
    pub legacy: &'static str,
    pub target: &'static str,
    pub mean: &'static str,
    pub trend: &'static str,
    pub examples: &'static str,
    pub no_examples: &'static str,
    pub expected: &'static str,
    pub note: &'static str,
    pub source: &'static str,
    pub columns: &'static str,
    pub params: &'static str,
    pub differing_rows: &'static str,
    pub audit: &'static str,
    pub behaviour_changes: &'static str,
    pub behaviour_intro: &'static str,
    pub behaviour_change: &'static str,
    pub kind: &'static str,
    pub seen: &'static str,
    pub accepted: &'static str,
    pub not_accepted: &'static str,
    pub undeclared: &'static str,
    pub when: &'static str,
    pub change: &'static str,
    pub by: &'static str,
    pub why: &'static str,
    pub forced: &'static str,
    pub empty: &'static str,
    pub no_samples: &'static str,
    pub match_rate_chart: &'static str,
    pub latency_chart: &'static str,
    pub outcome_names: [&'static str; 11],
    pub writes_by_verify: &'static str,
    /// The words after each of the last verify's counts: legacy rows, v2 rows, missing,
    /// extra, different, quarantined, failed checks.
    pub verify_counts: [&'static str; 7],
    /// After the count of performance criteria a verify did not meet.
    pub slow_timings: &'static str,
}

/// Outcome keys in the order of [`Text::outcome_names`].
pub const OUTCOMES: [&str; 11] = [
    "matched",
    "expected",
    "confirmed",
    "drift",
    "rewrite_bug",
    "error",
    "undetermined",
    "transient",
    "nondeterministic",
    "skipped",
    "dropped",
];

pub const EN: Text = Text {
    lang: "en",
    title: "cutover divergence report",
    window: "Window",
    generated: "generated",
    overall: "Overall",
    success_rate: "Success rate (confirmed matches)",
    improvement: "Performance improvement (mean latency, target vs legacy)",
    slower_plans: "Slower on the target: the plans (generic, as PostgreSQL runs them for any parameters)",
    samples: "Compared samples",
    write_divergences: "Write divergences",
    pending_repair: "waiting for repair",
    repaired: "repaired",
    backfill: "Backfill",
    last_verify: "Last verify",
    clean: "clean",
    drift: "drift",
    none: "none",
    nothing_to_copy: "completed: nothing to copy",
    rows: "rows",
    absent: "(absent)",
    key: "key",
    column: "column",
    error: "error",
    whole_row: "(row)",
    query_types: "Query types",
    query_type: "Query type",
    stage: "Stage",
    match_rate: "Match rate",
    verdict: "Readiness",
    ready_for: "READY for",
    not_ready_for: "NOT READY for",
    needs: "needs",
    final_stage: "final stage",
    outcomes: "Outcomes",
    outcome: "Outcome",
    count: "Count",
    latency: "Latency (ms)",
    side: "Side",
    legacy: "legacy",
    target: "target",
    mean: "mean",
    trend: "Trend",
    examples: "Examples of confirmed divergences",
    no_examples: "No divergence sampled in the window.",
    expected: "Expected divergences (counted apart)",
    note: "Note",
    source: "Source",
    columns: "Columns",
    params: "Parameters",
    differing_rows: "Differing rows",
    audit: "Stage changes",
    behaviour_changes: "Behaviour changes",
    behaviour_intro: "Where v2 answers differently on purpose. The gate lets none of the query types listed serve from v2 until the change is accepted.",
    behaviour_change: "Change",
    kind: "Kind",
    seen: "Seen",
    accepted: "Accepted",
    not_accepted: "NOT ACCEPTED",
    undeclared: "NOT DECLARED in the rules: v2 behaved differently in a way no rule names",
    when: "When",
    change: "Change",
    by: "By",
    why: "Why",
    forced: "forced",
    empty: "No comparisons in this window: put query types in shadow (cutover ctl set QUERY_TYPE shadow) and let traffic flow.",
    no_samples: "no comparisons yet",
    match_rate_chart: "match rate (%)",
    latency_chart: "mean latency (ms): legacy solid, target dashed",
    writes_by_verify: "needs a clean `cutover verify` in the last hour (writes are not compared by the shadow: verify is their evidence)",
    verify_counts: [
        "legacy",
        "v2 rows",
        "missing",
        "extra",
        "different",
        "quarantined",
        "failed checks",
    ],
    slow_timings: "performance criteria not met (timing, not drift)",
    outcome_names: [
        "matched",
        "expected (reviewed)",
        "confirmed divergences",
        "  data drift",
        "  rewrite bug",
        "  error",
        "  undetermined",
        "transient (raced a write)",
        "nondeterministic (not compared)",
        "skipped",
        "dropped (queue full)",
    ],
};

pub const PT_BR: Text = Text {
    lang: "pt-BR",
    title: "Relatório de divergências do cutover",
    window: "Janela",
    generated: "gerado em",
    overall: "Visão geral",
    success_rate: "Taxa de sucesso (correspondências confirmadas)",
    improvement: "Melhoria de desempenho (latência média, alvo vs legado)",
    slower_plans: "Mais lento no alvo: os planos (genéricos, como o PostgreSQL os executa para quaisquer parâmetros)",
    samples: "Amostras comparadas",
    write_divergences: "Divergências de escrita",
    pending_repair: "aguardando reparo",
    repaired: "reparadas",
    backfill: "Backfill",
    last_verify: "Última verificação",
    clean: "sem divergências",
    drift: "com divergências",
    none: "nenhum",
    nothing_to_copy: "concluído: nada a copiar",
    rows: "linhas",
    absent: "(ausente)",
    key: "chave",
    column: "coluna",
    error: "erro",
    whole_row: "(linha)",
    query_types: "Tipos de consulta",
    query_type: "Tipo de consulta",
    stage: "Estágio",
    match_rate: "Taxa de correspondência",
    verdict: "Prontidão",
    ready_for: "PRONTO para",
    not_ready_for: "NÃO ESTÁ PRONTO para",
    needs: "falta",
    final_stage: "estágio final",
    outcomes: "Resultados",
    outcome: "Resultado",
    count: "Quantidade",
    latency: "Latência (ms)",
    side: "Lado",
    legacy: "legado",
    target: "alvo",
    mean: "média",
    trend: "Tendência",
    examples: "Exemplos de divergências confirmadas",
    no_examples: "Nenhuma divergência amostrada na janela.",
    expected: "Divergências esperadas (contadas à parte)",
    note: "Nota",
    source: "Origem",
    columns: "Colunas",
    params: "Parâmetros",
    differing_rows: "Linhas divergentes",
    audit: "Mudanças de estágio",
    behaviour_changes: "Mudanças de comportamento",
    behaviour_intro: "Onde a v2 responde diferente de propósito. O portão não deixa nenhum dos tipos de consulta listados ser servido pela v2 até a mudança ser aceita.",
    behaviour_change: "Mudança",
    kind: "Tipo",
    seen: "Vista",
    accepted: "Aceita",
    not_accepted: "NÃO ACEITA",
    undeclared: "NÃO DECLARADA nas regras: a v2 se comportou diferente de um jeito que nenhuma regra nomeia",
    when: "Quando",
    change: "Mudança",
    by: "Por",
    why: "Motivo",
    forced: "forçada",
    empty: "Nenhuma comparação nesta janela: coloque tipos de consulta em shadow (cutover ctl set TIPO shadow) e deixe o tráfego fluir.",
    no_samples: "ainda sem comparações",
    match_rate_chart: "taxa de correspondência (%)",
    latency_chart: "latência média (ms): legado contínua, alvo tracejada",
    writes_by_verify: "falta um `cutover verify` sem divergências na última hora (escritas não são comparadas pelo shadow: o verify é a evidência delas)",
    verify_counts: [
        "linhas no legado",
        "no v2",
        "faltando",
        "a mais",
        "diferentes",
        "em quarentena",
        "verificações com falha",
    ],
    slow_timings: "critérios de desempenho não atendidos (tempo, não divergência)",
    outcome_names: [
        "correspondências",
        "esperadas (revisadas)",
        "divergências confirmadas",
        "  divergência de dados",
        "  erro de reescrita",
        "  erro",
        "  indeterminada",
        "transitórias (corrida com escrita)",
        "não determinísticas (não comparadas)",
        "ignoradas",
        "descartadas (fila cheia)",
    ],
};

impl Lang {
    pub fn text(self) -> &'static Text {
        match self {
            Lang::En => &EN,
            Lang::PtBr => &PT_BR,
        }
    }
}

/// A backfill's state as the report stores it (`completed`, `in progress: PHASE`), in the
/// report's language (the phase is a name, shown as stored).
pub fn backfill_state(lang: Lang, state: &str) -> String {
    match (lang, state) {
        (Lang::PtBr, "completed") => "concluído".to_owned(),
        (Lang::PtBr, s) => match s.strip_prefix("in progress: ") {
            Some(phase) => format!("em andamento: {phase}"),
            None => s.to_owned(),
        },
        (Lang::En, s) => s.to_owned(),
    }
}

/// The last verify's line: when, its verdict, its counts.
pub fn verify_line(lang: Lang, v: &super::VerifyRun) -> String {
    let t = lang.text();
    let verdict = if v.ok { t.clean } else { t.drift };
    let counts = [
        v.legacy_rows,
        v.target_rows,
        v.missing,
        v.extra,
        v.different,
        v.quarantined,
        i64::from(v.failed_checks),
    ];
    let [legacy, target, rest @ ..] = counts.map(|n| n.to_string());
    let [w_legacy, w_target, words @ ..] = t.verify_counts;
    let rest: Vec<String> = rest
        .iter()
        .zip(words)
        .map(|(n, word)| format!("{n} {word}"))
        .collect();
    let mut line = format!(
        "{} — {verdict} ({legacy} {w_legacy} / {target} {w_target}; {})",
        v.ran_at,
        rest.join(", ")
    );
    if v.slow_timings > 0 {
        line += &format!("; {} {}", v.slow_timings, t.slow_timings);
    }
    line
}
