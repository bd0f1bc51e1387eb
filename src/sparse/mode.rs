//! Sparse modes as users name them (`dense`, `cats@0.5`, `oracle@0.5`, `dejavu`, `dejavu@0.7`): parsed once
//! into [`Mode`], printed back the same way.

use std::fmt;
use std::str::FromStr;

use crate::error::OptionError;

/// How a global sparsity is spread over layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Budget {
    /// The same k in every layer.
    #[default]
    Uniform,
    /// Per-layer k from a greedy allocation on calibration error (`calibrate --rule R`), spelled `R@S+greedy`.
    Greedy,
}

/// Which rule chooses each token's MLP neurons (and, with predictors, heads). Sparsities are the fraction of
/// MLP neurons dropped, in `[0, 1)` (for the input-sparse rules `teal` and `wina`: the fraction of MLP input
/// channels dropped and the fraction of hidden neurons dropped, each).
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
    /// Exact-down: dense gate/up, then the down projection reads only the top-k rows by exact |hidden value|
    /// (the oracle's selection, as a deployable rule: it pays for the full gate/up pass).
    ExactDown(f64, Budget),
    /// Quantized score: |SiLU(ĝ)·û| from low-bit copies of gate/up (`calibrate --rule qscore`), top-k, then
    /// exact gate/up/down for the kept neurons only.
    QScore(f64, Budget),
    /// Cascade: the quantized score picks `CASCADE_FACTOR`·k candidates, their exact gate/up give exact hidden
    /// values, and the exact top-k of those goes to down.
    Cascade(f64, Budget),
    /// TEAL: per-layer calibrated thresholds on |x| (MLP input channels) and on |hidden| (down's input). With
    /// [`Budget::Greedy`] each layer's sparsity is its calibrated budget, the thresholds its quantiles.
    Teal(f64, Budget),
    /// WINA: top-k input channels by |x_i|·‖[W_gate; W_up][:, i]‖, then top-k hidden by |h_j|·‖W_down[:, j]‖.
    /// With [`Budget::Greedy`] each layer drops its calibrated fraction of both.
    Wina(f64, Budget),
}

/// Candidates a cascade computes exactly, as a multiple of the k it finally keeps.
pub const CASCADE_FACTOR: f64 = 1.5;

impl Mode {
    pub const HELP: &'static str = "dense, cats@S, oracle@S, dejavu[@S], exactdown@S, qscore@S, cascade@S, teal@S or wina@S \
with S in [0, 1) (all but cats, oracle and dejavu also as R@S+greedy for per-layer budgets)";

    /// The MLP sparsity the mode asks for, if it names one.
    pub fn sparsity(&self) -> Option<f64> {
        match *self {
            Mode::Dense => None,
            Mode::Cats(s) | Mode::Oracle(s) => Some(s),
            Mode::ExactDown(s, _) | Mode::QScore(s, _) | Mode::Cascade(s, _) | Mode::Teal(s, _) | Mode::Wina(s, _) => Some(s),
            Mode::Dejavu(s) => s,
        }
    }

    /// The per-layer budget the mode asks for.
    pub fn budget(&self) -> Budget {
        match *self {
            Mode::ExactDown(_, b) | Mode::QScore(_, b) | Mode::Cascade(_, b) | Mode::Teal(_, b) | Mode::Wina(_, b) => b,
            _ => Budget::Uniform,
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
        let (body, budget) = match spec.trim().strip_suffix("+greedy") {
            Some(b) => (b, Budget::Greedy),
            None => (spec.trim(), Budget::Uniform),
        };
        let (kind, s) = match body.split_once('@') {
            Some((k, s)) => {
                let v: f64 = s.trim().parse().map_err(|_| bad(format!("`{spec}`: `{s}` is not a number")))?;
                if !(0.0..1.0).contains(&v) {
                    return Err(bad(format!("`{spec}`: sparsity {v} is not in [0, 1)")));
                }
                (k.trim(), Some(v))
            }
            None => (body, None),
        };
        if budget == Budget::Greedy && !matches!(kind, "exactdown" | "qscore" | "cascade" | "teal" | "wina") {
            return Err(bad(format!("`{spec}`: +greedy applies to exactdown, qscore, cascade, teal and wina")));
        }
        match (kind, s) {
            ("dense", None) => Ok(Mode::Dense),
            ("dense", Some(_)) => Err(bad(format!("`{spec}`: dense takes no sparsity"))),
            ("cats", Some(s)) => Ok(Mode::Cats(s)),
            ("oracle", Some(s)) => Ok(Mode::Oracle(s)),
            ("exactdown", Some(s)) => Ok(Mode::ExactDown(s, budget)),
            ("qscore", Some(s)) => Ok(Mode::QScore(s, budget)),
            ("cascade", Some(s)) => Ok(Mode::Cascade(s, budget)),
            ("teal", Some(s)) => Ok(Mode::Teal(s, budget)),
            ("wina", Some(s)) => Ok(Mode::Wina(s, budget)),
            ("cats" | "oracle" | "exactdown" | "qscore" | "cascade" | "teal" | "wina", None) => {
                Err(bad(format!("`{spec}` needs a sparsity, e.g. {kind}@0.5")))
            }
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
            Mode::ExactDown(s, b) => write!(f, "exactdown@{s}{}", suffix(b)),
            Mode::QScore(s, b) => write!(f, "qscore@{s}{}", suffix(b)),
            Mode::Cascade(s, b) => write!(f, "cascade@{s}{}", suffix(b)),
            Mode::Teal(s, b) => write!(f, "teal@{s}{}", suffix(b)),
            Mode::Wina(s, b) => write!(f, "wina@{s}{}", suffix(b)),
        }
    }
}

fn suffix(b: Budget) -> &'static str {
    match b {
        Budget::Uniform => "",
        Budget::Greedy => "+greedy",
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
        for s in [
            "dense", "cats@0.5", "oracle@0.7", "dejavu", "dejavu@0.25", "oracle@0", "exactdown@0.5", "qscore@0.7+greedy",
            "cascade@0.7", "cascade@0.5+greedy", "teal@0.5", "wina@0.7", "exactdown@0.3+greedy", "teal@0.7+greedy",
            "wina@0.5+greedy",
        ] {
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
            ("qscore", "needs a sparsity"),
            ("oracle@0.5+greedy", "+greedy applies to"),
            ("cats@0.5+greedy", "+greedy applies to"),
            ("qscore@0.5+uniform", "not a number"),
        ] {
            let e = s.parse::<Mode>().unwrap_err();
            assert_eq!(e.field, "mode");
            assert!(e.to_string().contains(words), "{s}: {e}");
        }
    }
}
