//! Sparse modes as users name them (`dense`, `cats@0.5`, `oracle@0.5`, `dejavu`, `dejavu@0.7`): parsed once
//! into [`Mode`], printed back the same way.

use std::fmt;
use std::str::FromStr;

use crate::error::OptionError;

/// Which rule chooses each token's MLP neurons (and, with predictors, heads). Sparsities are the fraction of
/// MLP neurons dropped, in `[0, 1)`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Mode {
    Dense,
    /// CATS: per-layer thresholds on the gate magnitude, calibrated for this sparsity.
    Cats(f64),
    /// Per token, the true top (1−S)·ffn neurons by |hidden value|: the bound a predictor can reach.
    Oracle(f64),
    /// Deja Vu predictors: k per layer from the predictor manifest, or (1−S)·ffn when a sparsity is given.
    Dejavu(Option<f64>),
}

impl Mode {
    pub const HELP: &'static str = "dense, cats@S, oracle@S or dejavu[@S] with S in [0, 1)";

    /// The MLP sparsity the mode asks for, if it names one.
    pub fn sparsity(&self) -> Option<f64> {
        match *self {
            Mode::Dense => None,
            Mode::Cats(s) | Mode::Oracle(s) => Some(s),
            Mode::Dejavu(s) => s,
        }
    }

    pub fn is_dense(&self) -> bool {
        *self == Mode::Dense
    }
}

impl FromStr for Mode {
    type Err = OptionError;

    fn from_str(spec: &str) -> Result<Self, OptionError> {
        let bad = |msg: String| OptionError::new("mode", msg);
        let (kind, s) = match spec.trim().split_once('@') {
            Some((k, s)) => {
                let v: f64 = s.trim().parse().map_err(|_| bad(format!("`{spec}`: `{s}` is not a number")))?;
                if !(0.0..1.0).contains(&v) {
                    return Err(bad(format!("`{spec}`: sparsity {v} is not in [0, 1)")));
                }
                (k.trim(), Some(v))
            }
            None => (spec.trim(), None),
        };
        match (kind, s) {
            ("dense", None) => Ok(Mode::Dense),
            ("dense", Some(_)) => Err(bad(format!("`{spec}`: dense takes no sparsity"))),
            ("cats", Some(s)) => Ok(Mode::Cats(s)),
            ("oracle", Some(s)) => Ok(Mode::Oracle(s)),
            ("cats" | "oracle", None) => Err(bad(format!("`{spec}` needs a sparsity, e.g. {kind}@0.5"))),
            ("dejavu", s) => Ok(Mode::Dejavu(s)),
            _ => Err(bad(format!("`{spec}` is not a mode; expected {}", Mode::HELP))),
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Mode::Dense => write!(f, "dense"),
            Mode::Cats(s) => write!(f, "cats@{s}"),
            Mode::Oracle(s) => write!(f, "oracle@{s}"),
            Mode::Dejavu(None) => write!(f, "dejavu"),
            Mode::Dejavu(Some(s)) => write!(f, "dejavu@{s}"),
        }
    }
}

impl From<Mode> for String {
    fn from(m: Mode) -> String {
        m.to_string()
    }
}

impl TryFrom<String> for Mode {
    type Error = OptionError;
    fn try_from(s: String) -> Result<Self, OptionError> {
        s.parse()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_round_trip() {
        for s in ["dense", "cats@0.5", "oracle@0.7", "dejavu", "dejavu@0.25", "oracle@0"] {
            let m: Mode = s.parse().unwrap();
            assert_eq!(m.to_string(), s);
        }
        assert_eq!("oracle@0.50".parse::<Mode>().unwrap(), Mode::Oracle(0.5));
    }

    #[test]
    fn rejects_bad_modes_naming_the_field() {
        for (s, words) in [
            ("sparse", "not a mode"),
            ("oracle@1.5", "not in [0, 1)"),
            ("oracle@-0.1", "not in [0, 1)"),
            ("cats", "needs a sparsity"),
            ("oracle@x", "not a number"),
            ("dense@0.5", "takes no sparsity"),
        ] {
            let e = s.parse::<Mode>().unwrap_err();
            assert_eq!(e.field, "mode");
            assert!(e.to_string().contains(words), "{s}: {e}");
        }
    }
}
