//! What divergence samples may show of people's data: the rules' `[redaction]` section.
//!
//! A column is sensitive when its name contains one of the built-in parts
//! ([`DEFAULT_SENSITIVE`]) or one the rules add (`sensitive`), unless the rules list it in
//! `shown`. A sample never stores a sensitive column's values, nor a parameter compared with
//! one (or with no column at all); statements are stored with their literals taken out
//! whatever protocol brought them (`shadow::redact`).
//!
//! ```toml
//! [redaction]
//! sensitive = ["birth", "pix"]   # more name parts whose values are never shown
//! shown = ["status"]             # columns shown although a part matches them
//! ```

/// Parts of column names whose values are personal: names, contacts, documents, secrets.
pub const DEFAULT_SENSITIVE: &[&str] = &[
    "name", "email", "mail", "phone", "document", "cpf", "cnpj", "passport", "tax", "ssn",
    "password", "secret", "token", "address", "birth",
];

/// The redaction policy of a rule set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redaction {
    /// Lower-case name parts.
    sensitive: Vec<String>,
    /// Lower-case column names exempted.
    shown: Vec<String>,
}

impl Default for Redaction {
    fn default() -> Self {
        Self {
            sensitive: DEFAULT_SENSITIVE.iter().map(|s| (*s).to_owned()).collect(),
            shown: Vec::new(),
        }
    }
}

impl Redaction {
    /// The built-in parts plus `sensitive`, except the columns in `shown`.
    pub fn new(sensitive: &[String], shown: &[String]) -> Self {
        let mut policy = Self::default();
        policy
            .sensitive
            .extend(sensitive.iter().map(|s| s.to_lowercase()));
        policy.shown = shown.iter().map(|s| s.to_lowercase()).collect();
        policy
    }

    /// Whether values of `column` are never shown.
    pub fn sensitive(&self, column: &str) -> bool {
        let column = column.to_lowercase();
        !self.shown.contains(&column) && self.sensitive.iter().any(|s| column.contains(s.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_contacts_and_documents_are_sensitive_unless_shown() {
        let policy = Redaction::default();
        for column in ["name", "email", "Phone_Number", "cpf", "birth_date"] {
            assert!(policy.sensitive(column), "{column}");
        }
        for column in [
            "affiliate_id",
            "status",
            "total_deposits",
            "level_1_referrals",
        ] {
            assert!(!policy.sensitive(column), "{column}");
        }
        let policy = Redaction::new(&["status".into()], &["name".into()]);
        assert!(policy.sensitive("status") && !policy.sensitive("name"));
        assert!(policy.sensitive("email"));
    }
}
