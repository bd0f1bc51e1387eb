//! The header every artifact carries (format tag and version, the dejavu that wrote it, the model it was made
//! for, the resolved options, when), and the one check a stage makes before it trusts an artifact it reads.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::{BUILD, VERSION};
use crate::error::{Error, Result};
use crate::source::ModelIdentity;

/// `RUN/acts/manifest.json` (and the metadata of its shards). Version 1 was the unversioned `dejavu-acts/1`.
pub const ACTS_FORMAT: &str = "dejavu.acts";
pub const ACTS_VERSION: u32 = 2;
/// `RUN/predictors/manifest.json` (and the metadata of `predictors.safetensors`). Version 1: `dejavu-predictors/1`.
pub const PREDICTORS_FORMAT: &str = "dejavu.predictors";
pub const PREDICTORS_VERSION: u32 = 2;
/// The thresholds file `calibrate` writes. Version 1 had no header.
pub const THRESHOLDS_FORMAT: &str = "dejavu.thresholds";
pub const THRESHOLDS_VERSION: u32 = 2;
/// `RUN/rules.json`: what `calibrate --rule R` calibrates for the SwiGLU rules (TEAL thresholds, budgets).
pub const RULES_FORMAT: &str = "dejavu.rules";
pub const RULES_VERSION: u32 = 1;
/// `RUN/qscore.safetensors`: low-bit score copies of gate/up (the header sits in the safetensors metadata).
pub const QSCORE_FORMAT: &str = "dejavu.qscore";
pub const QSCORE_VERSION: u32 = 1;
/// `eval`'s `results.json`.
pub const EVAL_FORMAT: &str = "dejavu.eval";
pub const EVAL_VERSION: u32 = 1;

/// The command that writes each format, named when an artifact has to be made again.
const WRITERS: [(&str, &str); 6] = [
    (ACTS_FORMAT, "dejavu collect"),
    (PREDICTORS_FORMAT, "dejavu train-predictors"),
    (THRESHOLDS_FORMAT, "dejavu calibrate"),
    (RULES_FORMAT, "dejavu calibrate --rule R"),
    (QSCORE_FORMAT, "dejavu calibrate --rule qscore"),
    (EVAL_FORMAT, "dejavu eval"),
];

fn writer_of(format: &str) -> &'static str {
    WRITERS.iter().find(|(f, _)| *f == format).map(|(_, w)| *w).unwrap_or("the stage that wrote it")
}

/// Stored under the key `header` of every JSON artifact.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ArtifactHeader {
    /// What the file is, e.g. `dejavu.acts`.
    pub format: String,
    /// Version of that format; a reader refuses any other.
    pub version: u32,
    /// The dejavu that wrote it.
    pub tool_version: String,
    /// Its build: git commit and cargo features (absent from files of older dejavus).
    #[serde(default)]
    pub build: String,
    /// The model the artifact was made from; compared by fingerprint.
    pub model: ModelIdentity,
    /// The options the writing stage ran with, resolved (defaults filled in).
    pub options: serde_json::Value,
    /// When it was written, RFC 3339 in UTC.
    pub created: String,
}

impl ArtifactHeader {
    /// A header stamped with this dejavu's version and the current time.
    pub fn new(format: &str, version: u32, model: ModelIdentity, options: &impl serde::Serialize) -> Self {
        ArtifactHeader {
            format: format.to_string(),
            version,
            tool_version: VERSION.to_string(),
            build: BUILD.to_string(),
            model,
            // Serializing plain option structs cannot fail; `null` would only hide a non-string map key.
            options: serde_json::to_value(options).unwrap_or_default(),
            created: rfc3339_utc(std::time::SystemTime::now()),
        }
    }

    /// The artifact at `path` (whose header this is) must be of `expected_format` at `supported_version` and made
    /// for `model`; otherwise a one-line error naming `path`.
    pub fn check(&self, path: &Path, expected_format: &str, supported_version: u32, model: &ModelIdentity) -> Result<()> {
        self.check_format(path, expected_format, supported_version)?;
        model.ensure_same(&self.model, path).map_err(Error::OtherModel)
    }

    /// [`ArtifactHeader::check`] without the model (a stage that is not told the model).
    pub fn check_format(&self, path: &Path, expected_format: &str, supported_version: u32) -> Result<()> {
        if self.format != expected_format {
            return Err(Error::field(path, "header.format", format!("expected `{expected_format}`, found `{}`", self.format)));
        }
        let (v, writer) = (self.version, writer_of(expected_format));
        if v < supported_version {
            return Err(Error::format(
                path,
                format!(
                    "`{expected_format}` version {v}, written by an older dejavu ({}); this one reads version {supported_version}: re-run `{writer}`",
                    self.tool_version
                ),
            ));
        }
        if v > supported_version {
            return Err(Error::format(
                path,
                format!(
                    "`{expected_format}` version {v}, written by a newer dejavu ({}); this one reads version {supported_version}",
                    self.tool_version
                ),
            ));
        }
        Ok(())
    }
}

/// Read the JSON artifact at `path`: its header (key `header`) is checked first, against `format`, `version` and
/// `model` when given, so that a file of an older dejavu or another kind gets a one-line reason instead of a
/// missing-field error; then the whole file is parsed as `T`.
pub fn read_artifact<T: DeserializeOwned>(path: &Path, format: &str, version: u32, model: Option<&ModelIdentity>) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let doc: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::json(path, e))?;
    let Some(h) = doc.get("header") else {
        // Version 1 files had no header: acts and predictors a `format` tag such as `dejavu-acts/1`, thresholds none.
        let old = match doc.get("format").and_then(|f| f.as_str()) {
            Some(f) => format!(" (format `{f}`)"),
            None => String::new(),
        };
        return Err(Error::format(
            path,
            format!("no artifact header{old}: not a `{format}` file, or one written by an older dejavu; re-run `{}`", writer_of(format)),
        ));
    };
    let header = ArtifactHeader::deserialize(h).map_err(|e| Error::field(path, "header", e.to_string()))?;
    match model {
        Some(m) => header.check(path, format, version, m)?,
        None => header.check_format(path, format, version)?,
    }
    serde_json::from_value(doc).map_err(|e| Error::format(path, format!("invalid `{format}` file: {e}")))
}

/// The current time as `YYYY-MM-DDThh:mm:ssZ`.
pub fn now_rfc3339() -> String {
    rfc3339_utc(std::time::SystemTime::now())
}

/// `t` as `YYYY-MM-DDThh:mm:ssZ` (whole seconds, UTC).
fn rfc3339_utc(t: std::time::SystemTime) -> String {
    let secs = t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Proleptic Gregorian date of `z` days after 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + (m <= 2) as i64;
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        use std::time::{Duration, UNIX_EPOCH};
        assert_eq!(rfc3339_utc(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        // 2000-02-29 (a leap day of a century leap year) and 2024-12-31 23:59:59.
        assert_eq!(rfc3339_utc(UNIX_EPOCH + Duration::from_secs(951_782_400)), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339_utc(UNIX_EPOCH + Duration::from_secs(1_735_689_599)), "2024-12-31T23:59:59Z");
    }
}
