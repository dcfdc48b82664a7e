//! `domainNames` peers: exact names and `*.` wildcards, as NPEP-133 writes them.
//!
//! A name is compared case-insensitively and without its trailing dot. `*.example.com`
//! matches one or more whole labels in front of `example.com`, never `example.com`
//! itself. The kernel matches by the hashes of `egret_common::dns`, which this module
//! computes the same way from the written name.

use std::fmt;

use egret_common::dns::{exact_key, name_hash, wildcard_key};

/// One entry of a `domainNames` peer, normalised.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DomainName {
    /// Lowercase, no trailing dot, without the `*.` of a wildcard.
    pub name: String,
    pub wildcard: bool,
}

impl DomainName {
    /// Parses one entry.
    ///
    /// # Errors
    /// A description of what is wrong, for the caller to name the field.
    pub fn parse(text: &str) -> Result<Self, String> {
        let trimmed = text.strip_suffix('.').unwrap_or(text);
        let (wildcard, name) = match trimmed.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, trimmed),
        };
        let name = name.to_ascii_lowercase();
        let labels: Vec<&str> = name.split('.').collect();
        if labels.len() < 2 {
            return Err(format!(
                "{text:?} is not a domain name (it needs at least two labels)"
            ));
        }
        for label in &labels {
            let valid_chars = label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            let alphanumeric_ends = label
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_alphanumeric())
                && label
                    .bytes()
                    .last()
                    .is_some_and(|b| b.is_ascii_alphanumeric());
            if label.len() > 63 || !valid_chars || !alphanumeric_ends {
                return Err(format!(
                    "{text:?} is not a domain name (label {label:?}: 1-63 letters, digits, \
                     '-' or '_', starting and ending with a letter or digit; '*' only as a \
                     whole first label)"
                ));
            }
        }
        if name.len() > 253 || name_hash(&name).is_none() {
            return Err(format!(
                "{text:?} is too long (Egret matches names of up to 253 characters and {} labels)",
                egret_common::dns::MAX_LABELS
            ));
        }
        Ok(Self { name, wildcard })
    }

    /// Whether `resolved` (a name a pod looked up) matches.
    #[must_use]
    pub fn matches(&self, resolved: &str) -> bool {
        let resolved = resolved.strip_suffix('.').unwrap_or(resolved);
        let resolved = resolved.to_ascii_lowercase();
        if self.wildcard {
            resolved
                .strip_suffix(self.name.as_str())
                .is_some_and(|front| front.len() > 1 && front.ends_with('.'))
        } else {
            resolved == self.name
        }
    }

    /// Every name this one matches, `other` matches too: the kernel takes the most
    /// specific match, so its entry carries what every covering pattern allows.
    #[must_use]
    pub fn is_covered_by(&self, other: &DomainName) -> bool {
        if !other.wildcard {
            return self == other;
        }
        let under = |name: &str| {
            name.strip_suffix(other.name.as_str())
                .is_some_and(|front| front.len() > 1 && front.ends_with('.'))
        };
        if self.wildcard {
            self.name == other.name || under(&self.name)
        } else {
            under(&self.name)
        }
    }

    /// The key the kernel looks this pattern up by.
    ///
    /// # Panics
    /// Never for a name made by [`DomainName::parse`], which checks it hashes.
    #[must_use]
    pub fn key(&self) -> u64 {
        let hash = name_hash(&self.name).expect("validated by parse");
        if self.wildcard {
            wildcard_key(hash)
        } else {
            exact_key(hash)
        }
    }
}

impl fmt::Display for DomainName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.wildcard {
            write!(f, "*.{}", self.name)
        } else {
            f.write_str(&self.name)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::DomainName;

    fn name(text: &str) -> DomainName {
        DomainName::parse(text).expect("valid")
    }

    #[test]
    fn names_normalise_and_match_whole_labels() {
        assert_eq!(name("API.Example.Test."), name("api.example.test"));
        let wildcard = name("*.svc.example.test");
        assert!(wildcard.matches("a.svc.example.test"));
        assert!(wildcard.matches("A.B.Svc.Example.Test."));
        assert!(!wildcard.matches("svc.example.test"));
        assert!(!wildcard.matches("xsvc.example.test"));
        assert!(name("api.example.test").matches("API.EXAMPLE.TEST"));
        assert!(!name("api.example.test").matches("www.api.example.test"));
        assert_eq!(wildcard.to_string(), "*.svc.example.test");
    }

    #[test]
    fn invalid_names_say_why() {
        for bad in [
            "",
            "localhost",
            "*.com",
            "a..b",
            "-a.b",
            "a.b-",
            "_a.b",
            "*.*.a.b",
            "a*.b.c",
            "a b.c",
        ] {
            let error = DomainName::parse(bad).expect_err(bad);
            assert!(error.contains(&format!("{bad:?}")), "{error}");
        }
        assert!(DomainName::parse(&format!("{}.test", "a".repeat(64))).is_err());
    }

    #[test]
    fn coverage_follows_the_kernels_most_specific_match() {
        let exact = name("a.svc.example.test");
        let svc = name("*.svc.example.test");
        let example = name("*.example.test");
        assert!(exact.is_covered_by(&svc));
        assert!(exact.is_covered_by(&example));
        assert!(svc.is_covered_by(&example));
        assert!(svc.is_covered_by(&svc));
        assert!(!example.is_covered_by(&svc));
        assert!(!name("svc.example.test").is_covered_by(&svc));
        assert_ne!(svc.key(), name("svc.example.test").key());
        assert_eq!(name("A.svc.example.test").key(), exact.key());
    }
}
