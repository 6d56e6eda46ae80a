//! Where configuration comes from besides the environment and flags: the config file (found by
//! `--config`, `HEARTH_CONFIG` or [`SEARCH_PATH`]) and `{key}_file` values, read from files
//! (secrets kept out of the environment and the config, as Docker and systemd hand them over).

use std::path::{Path, PathBuf};

use super::ConfigError;

/// Where the config file is looked for when neither `--config` nor `HEARTH_CONFIG` names one:
/// the first that exists.
pub const SEARCH_PATH: &[&str] = &["hearth.toml", "/etc/hearth/hearth.toml"];

/// The largest file a `{key}_file` value is read from (a secret, a URL).
const MAX_SECRET_FILE: u64 = 64 * 1024;

/// The config file: `explicit` (`--config`), else `HEARTH_CONFIG`, else the first of
/// [`SEARCH_PATH`] that exists. A file named explicitly must exist.
pub(super) fn config_file(explicit: Option<&Path>, env: &[(String, String)]) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return Some(p.to_path_buf());
    }
    match env.iter().find(|(k, _)| k == "HEARTH_CONFIG") {
        Some((_, v)) if !v.is_empty() => Some(PathBuf::from(v)),
        _ => SEARCH_PATH.iter().map(PathBuf::from).find(|p| p.exists()),
    }
}

/// The string key `key` stands for when it is spelled `{key}_file`.
pub(super) fn file_variant<'a>(key: &'a str, defaults: &toml::Table) -> Option<&'a str> {
    let stem = key.strip_suffix("_file")?;
    (!defaults.contains_key(key) && matches!(defaults.get(stem), Some(toml::Value::String(_))))
        .then_some(stem)
}

/// The content of a `{key}_file` (`spelled` as its layer spells it), without a final newline.
pub(super) fn read_value_file(
    path: &str,
    origin: &str,
    spelled: &str,
) -> Result<String, ConfigError> {
    let bad = |message: String| ConfigError::Invalid {
        origin: origin.into(),
        message: format!("{spelled}: {message}"),
    };
    let size = std::fs::metadata(path)
        .map_err(|e| bad(format!("cannot read {path}: {e}")))?
        .len();
    if size > MAX_SECRET_FILE {
        return Err(bad(format!(
            "{path} is {size} bytes, more than {MAX_SECRET_FILE}"
        )));
    }
    let text =
        std::fs::read_to_string(path).map_err(|e| bad(format!("cannot read {path}: {e}")))?;
    Ok(text.trim_end_matches(['\n', '\r']).to_string())
}

/// Replace the `{key}_file` entries of a layer by their keys, read from the files named.
pub(super) fn resolve_files(
    layer: toml::Table,
    defaults: &toml::Table,
    origin: &str,
    spell: impl Fn(&str) -> String,
) -> Result<toml::Table, ConfigError> {
    let mut out = toml::Table::new();
    for (key, value) in &layer {
        let Some(stem) = file_variant(key, defaults) else {
            out.insert(key.clone(), value.clone());
            continue;
        };
        if layer.contains_key(stem) {
            return Err(ConfigError::Invalid {
                origin: origin.into(),
                message: format!("both {} and {} are set", spell(stem), spell(key)),
            });
        }
        let Some(path) = value.as_str() else {
            return Err(ConfigError::Invalid {
                origin: origin.into(),
                message: format!("{} must be a file path", spell(key)),
            });
        };
        let content = read_value_file(path, origin, &spell(key))?;
        out.insert(stem.to_string(), toml::Value::String(content));
    }
    Ok(out)
}
