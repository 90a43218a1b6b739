//! Reading the configuration file of `--config`: its keys are the flags'
//! (and `namespaces`), each checked by name, and a value the command line or
//! the environment gives wins over the file's.

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory};

use super::{value_error, Config, ConfigError};
use channelbox_protocol::namespaces::Namespace;

impl Config {
    /// The values of the file at `path` where neither a flag nor the
    /// environment set one.
    pub(super) fn with_file(self, matches: &ArgMatches, path: &std::path::Path) -> Result<Config, ConfigError> {
        let file_error = |message: String| ConfigError::File {
            path: path.to_owned(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| file_error(e.to_string()))?;
        let file: toml::Table = text.parse().map_err(|e: toml::de::Error| file_error(e.to_string()))?;
        let mut merged = toml::Table::try_from(&self).map_err(|e| file_error(e.to_string()))?;
        for (key, value) in file {
            if !file_keys().any(|k| k == key) {
                return Err(ConfigError::UnknownKey {
                    path: path.to_owned(),
                    key,
                });
            }
            // The type is checked even where a flag wins, so that a broken
            // file is found before the day the flag is dropped.
            if key == NAMESPACES {
                check_namespaces(&value)?;
            }
            let mut probe = merged.clone();
            probe.insert(key.clone(), value.clone());
            probe.try_into::<Config>().map_err(|e| value_error(&key, e.message()))?;
            // `namespaces` is the file's alone: no flag or variable sets it.
            let from_user = key != NAMESPACES
                && matches!(
                    matches.value_source(&key),
                    Some(ValueSource::CommandLine | ValueSource::EnvVariable)
                );
            if !from_user {
                merged.insert(key, value);
            }
        }
        let mut config: Config = merged.try_into().map_err(|e| file_error(e.to_string()))?;
        config.config = self.config;
        config.print_config = self.print_config;
        Ok(config)
    }
}

/// The keys a configuration file may hold: every flag but `--config`,
/// `--print-config`, `--help` and `--version`.
fn file_keys() -> impl Iterator<Item = String> {
    Config::command()
        .get_arguments()
        .map(|a| a.get_id().to_string())
        .filter(|id| !["config", "print_config", "help", "version"].contains(&id.as_str()))
        .chain([NAMESPACES.to_owned()])
        .collect::<Vec<_>>()
        .into_iter()
}

/// The file's table of namespaces.
const NAMESPACES: &str = "namespaces";

/// Reads every option of the file's `namespaces` table on its own, so that
/// a refusal names it: `namespaces.NAME.OPTION` (an unknown option, a value
/// of the wrong type, `history_messages = 0`), or `namespaces.NAME` for a
/// namespace that is no table.
fn check_namespaces(value: &toml::Value) -> Result<(), ConfigError> {
    let Some(all) = value.as_table() else {
        return Err(value_error(NAMESPACES, "must be a table of namespaces"));
    };
    for (name, options) in all {
        // A group's namespace is the part of its name before the first `:`:
        // a name with `:`, whitespace or control characters, or too long to
        // begin a group name, would be accepted and never apply.
        if name.contains(':') || !channelbox_protocol::valid_group(&format!("{name}:")) {
            return Err(value_error(
                &format!("{NAMESPACES}.{name}"),
                "no group can be in this namespace: a name has no `:`, no whitespace \
                 or control characters, and leaves room for the group's own part",
            ));
        }
        let Some(options) = options.as_table() else {
            return Err(value_error(
                &format!("{NAMESPACES}.{name}"),
                "must be a table of options",
            ));
        };
        for (option, v) in options {
            let alone = toml::Table::from_iter([(option.clone(), v.clone())]);
            alone
                .try_into::<Namespace>()
                .map_err(|e| value_error(&format!("{NAMESPACES}.{name}.{option}"), e.message()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_is_a_file_key() {
        let keys: Vec<String> = file_keys().collect();
        assert!(keys.contains(&"allowed_origin".to_owned()));
        assert!(keys.contains(&"history_bytes".to_owned()));
        assert!(!keys.contains(&"config".to_owned()));
    }
}
