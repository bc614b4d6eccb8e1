//! Identifier newtypes. Each one parses its text once; a value that exists is valid.

use std::fmt;

/// Why a piece of text is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The text was empty (or only whitespace).
    #[error("must not be empty")]
    Empty,
    /// The text was longer than the identifier allows.
    #[error("is {len} characters long, at most {max} are allowed")]
    TooLong {
        /// Length of the rejected text in characters.
        len: usize,
        /// The maximum length.
        max: usize,
    },
    /// The text contained a character outside the allowed set.
    #[error("contains {0:?}; only letters, digits and . _ - : @ are allowed")]
    BadCharacter(char),
}

/// Checks `text` against the identifier rules with at most `max` characters.
pub(crate) fn check(text: &str, max: usize) -> Result<(), Error> {
    if text.trim().is_empty() {
        return Err(Error::Empty);
    }
    let len = text.chars().count();
    if len > max {
        return Err(Error::TooLong { len, max });
    }
    match text
        .chars()
        .find(|c| !(c.is_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '@')))
    {
        Some(c) => Err(Error::BadCharacter(c)),
        None => Ok(()),
    }
}

macro_rules! identifier {
    ($(#[$doc:meta])* $name:ident, $max:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Parses an identifier: non-empty, at most
            #[doc = concat!(stringify!($max))]
            /// characters, letters, digits and `. _ - : @` only.
            ///
            /// # Errors
            /// Returns [`Error`] naming what is wrong with the text.
            pub fn parse(text: impl Into<String>) -> Result<Self, Error> {
                let text = text.into();
                check(&text, $max)?;
                Ok(Self(text))
            }

            /// The identifier as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = String::deserialize(d)?;
                Self::parse(text).map_err(serde::de::Error::custom)
            }
        }
    };
}

identifier!(
    /// The identifier of a batch job, unique within the service (`nightly-digest`).
    JobId,
    128
);
identifier!(
    /// The tenant that owns a job, its runs, results and references (`acme`).
    TenantId,
    128
);
identifier!(
    /// The identifier of an execution template (`digest`).
    TemplateId,
    128
);
identifier!(
    /// The identifier of a user in `system_users` (`u1`, `alice@acme`).
    UserId,
    256
);
identifier!(
    /// The feature type that selects user preferences for a Dynamic job (`daily-digest`).
    FeatureType,
    128
);

#[cfg(test)]
mod tests {
    use super::*;

    fn check_parse(text: &str, expected: Result<(), Error>) {
        assert_eq!(JobId::parse(text).map(|_| ()), expected, "{text:?}");
    }

    #[test]
    fn identifiers_parse_or_say_why_not() {
        check_parse("nightly-digest", Ok(()));
        check_parse("a.b_c:d@e-1", Ok(()));
        check_parse("", Err(Error::Empty));
        check_parse("   ", Err(Error::Empty));
        check_parse("has space", Err(Error::BadCharacter(' ')));
        check_parse("slash/no", Err(Error::BadCharacter('/')));
        check_parse(&"x".repeat(129), Err(Error::TooLong { len: 129, max: 128 }));
    }

    #[test]
    fn identifiers_deserialize_through_parse() {
        let id: JobId = serde_json::from_str("\"abc\"").unwrap();
        assert_eq!(id.as_str(), "abc");
        let err = serde_json::from_str::<JobId>("\"a b\"").unwrap_err();
        assert!(err.to_string().contains("contains ' '"), "{err}");
    }
}
