//! The server's settings file (`config/server.toml`, or `--config` / `BATCH_CONFIG`). Flags win
//! over environment variables, which win over the file, which wins over built-in defaults.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::ArgMatches;
use clap::parser::ValueSource;
use serde::Deserialize;

use crate::serve::ServeArgs;

/// What the settings file may say; every key is optional and unknown keys are errors.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SettingsFile {
    listen: Option<SocketAddr>,
    jobs: Option<PathBuf>,
    database_url: Option<String>,
    templates: Option<PathBuf>,
    sample_data: Option<PathBuf>,
    external_tables: Option<bool>,
    tokens: Option<String>,
    slots: Option<usize>,
    run_lease_secs: Option<u64>,
    max_running_runs: Option<usize>,
    shutdown_grace_secs: Option<u64>,
    max_watches_per_tenant: Option<usize>,
    request_timeout_secs: Option<u64>,
    otlp_endpoint: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_client_ca: Option<PathBuf>,
    reflection: Option<bool>,
    tick_ms: Option<u64>,
    request_endpoint: Option<String>,
    template_endpoint: Option<String>,
    preference_endpoint: Option<String>,
    sibling_timeout_ms: Option<u64>,
    breaker_cool_down_ms: Option<u64>,
}

impl SettingsFile {
    /// Reads `path`; a missing file is no settings when `required` is false.
    ///
    /// # Errors
    /// An unreadable file, bad TOML or an unknown key, naming the file.
    pub(crate) fn read(path: &Path, required: bool) -> anyhow::Result<SettingsFile> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                return Ok(SettingsFile::default());
            }
            Err(e) => {
                return Err(e).with_context(|| format!("reading settings {}", path.display()));
            }
        };
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("settings {}: {e}", path.display()))
    }

    /// Fills in `args` from the file where `matches` says the value is only a default.
    pub(crate) fn apply(self, args: &mut ServeArgs, matches: &ArgMatches) {
        let defaulted = |id: &str| {
            matches
                .value_source(id)
                .is_none_or(|source| source == ValueSource::DefaultValue)
        };
        macro_rules! take {
            ($field:ident) => {
                if let Some(value) = self.$field
                    && defaulted(stringify!($field))
                {
                    args.$field = value;
                }
            };
            (option $field:ident) => {
                if self.$field.is_some() && defaulted(stringify!($field)) {
                    args.$field = self.$field;
                }
            };
            (sibling $field:ident) => {
                if self.$field.is_some() && defaulted(stringify!($field)) {
                    args.siblings.$field = self.$field;
                }
            };
        }
        take!(listen);
        take!(jobs);
        take!(database_url);
        take!(templates);
        take!(sample_data);
        take!(slots);
        take!(run_lease_secs);
        take!(shutdown_grace_secs);
        take!(max_watches_per_tenant);
        take!(request_timeout_secs);
        take!(reflection);
        take!(tick_ms);
        take!(option external_tables);
        take!(option tokens);
        take!(option max_running_runs);
        take!(option otlp_endpoint);
        take!(option tls_cert);
        take!(option tls_key);
        take!(option tls_client_ca);
        take!(sibling request_endpoint);
        take!(sibling template_endpoint);
        take!(sibling preference_endpoint);
        if let Some(value) = self.sibling_timeout_ms
            && defaulted("sibling_timeout_ms")
        {
            args.siblings.sibling_timeout_ms = value;
        }
        if let Some(value) = self.breaker_cool_down_ms
            && defaulted("breaker_cool_down_ms")
        {
            args.siblings.breaker_cool_down_ms = value;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Cli;
    use clap::{CommandFactory, FromArgMatches};

    fn serve(argv: &[&str], file: &str) -> ServeArgs {
        let matches = Cli::command().get_matches_from(argv);
        let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| panic!("{e}"));
        let crate::Command::Serve(mut args) = cli.command else {
            panic!("not serve")
        };
        let file: SettingsFile = toml::from_str(file).unwrap_or_else(|e| panic!("{e}"));
        file.apply(
            &mut args,
            matches
                .subcommand_matches("serve")
                .unwrap_or_else(|| panic!("serve")),
        );
        *args
    }

    #[test]
    fn flags_win_over_the_file_and_the_file_over_defaults() {
        let args = serve(
            &["batch-server", "serve", "--slots", "7"],
            "slots = 3\ntick_ms = 50\nrequest_endpoint = \"http://requests:50051\"\n",
        );
        assert_eq!(args.slots, 7);
        assert_eq!(args.tick_ms, 50);
        assert_eq!(
            args.siblings.request_endpoint.as_deref(),
            Some("http://requests:50051")
        );
        assert_eq!(args.shutdown_grace_secs, 30, "untouched defaults stay");
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_key() {
        let error = toml::from_str::<SettingsFile>("slotz = 3")
            .unwrap_err()
            .to_string();
        assert!(error.contains("slotz"), "{error}");
    }
}
