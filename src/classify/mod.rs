//! Classification of statements: which ones concern the legacy table.
//!
//! Today this stage holds only the cheap pre-check that every Query and Parse goes through:
//! a case-insensitive search for the legacy table's name in the SQL text. Statements that
//! fail it are passthrough and are never parsed — they must cost next to nothing. Those that
//! pass will be parsed, fingerprinted and given a query type (rules, issue 4); a false
//! positive (the name inside a string or another identifier) only costs a parse.

pub mod fingerprint;

/// The pre-check for one legacy table name.
#[derive(Debug, Clone)]
pub struct Precheck {
    /// The table's name, lower case (`affiliates`).
    needle: Vec<u8>,
}

impl Precheck {
    pub fn new(table: &str) -> Self {
        Self {
            needle: table.to_ascii_lowercase().into_bytes(),
        }
    }

    /// Whether `sql` may mention the table (any case, quoted or not, qualified or not).
    pub fn mentions_table(&self, sql: &[u8]) -> bool {
        let Some((&first, rest)) = self.needle.split_first() else {
            return false;
        };
        let n = self.needle.len();
        let mut from = 0;
        while let Some(i) = memchr::memchr2(first, first.to_ascii_uppercase(), &sql[from..]) {
            let at = from + i;
            if sql.len() - at < n {
                return false;
            }
            if sql[at + 1..at + n].eq_ignore_ascii_case(rest) {
                return true;
            }
            from = at + 1;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_table_in_any_case_or_form() {
        let p = Precheck::new("affiliates");
        for sql in [
            "SELECT * FROM affiliates",
            "select * from PUBLIC.AFFILIATES a",
            "UPDATE \"affiliates\" SET x = 1",
            "SELECT 'public.Affiliates'::regclass",
        ] {
            assert!(p.mentions_table(sql.as_bytes()), "{sql}");
        }
        for sql in [
            "SELECT now()",
            "SELECT * FROM affiliate",
            "",
            "a",
            "affiliate",
        ] {
            assert!(!p.mentions_table(sql.as_bytes()), "{sql}");
        }
    }
}
