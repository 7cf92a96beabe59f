//! Row normalisers: softmax and α-entmax (sparsemax is α = 2).

use crate::error::{Error, Result};

/// How each sparse row of scores becomes probabilities.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Normalizer {
    Softmax,
    /// `p_i = [(α-1)s_i - τ]₊^{1/(α-1)}` with Σp = 1, for `1 < alpha <= 2`.
    Entmax { alpha: f32 },
    /// α-entmax with α = 2.
    Sparsemax,
}

impl Normalizer {
    /// α = 1.5, the common case.
    pub const ENTMAX15: Normalizer = Normalizer::Entmax { alpha: 1.5 };

    /// Checks α's domain; α = 1 is softmax and says so.
    pub fn validate(&self) -> Result<()> {
        if let Normalizer::Entmax { alpha } = *self {
            if !alpha.is_finite() {
                return Err(Error::Normalizer(format!("entmax alpha must be finite, got {alpha}")));
            }
            if alpha == 1.0 {
                return Err(Error::Normalizer(
                    "entmax alpha = 1 is softmax: use Normalizer::Softmax".into(),
                ));
            }
            if !(alpha > 1.0 && alpha <= 2.0) {
                return Err(Error::Normalizer(format!(
                    "entmax alpha must lie in (1, 2] (alpha -> 1 is Normalizer::Softmax), got {alpha}"
                )));
            }
        }
        Ok(())
    }

    /// α for the entmax family, `None` for softmax.
    pub fn alpha(&self) -> Option<f64> {
        match *self {
            Normalizer::Softmax => None,
            Normalizer::Entmax { alpha } => Some(alpha as f64),
            Normalizer::Sparsemax => Some(2.0),
        }
    }

    /// Parses `softmax`, `entmax15`, `sparsemax`, `entmax:ALPHA` (the CLI's spelling).
    pub fn parse(s: &str) -> Result<Self> {
        let n = match s {
            "softmax" => Normalizer::Softmax,
            "entmax15" | "entmax" => Normalizer::ENTMAX15,
            "sparsemax" => Normalizer::Sparsemax,
            other => match other.strip_prefix("entmax:") {
                Some(a) => Normalizer::Entmax {
                    alpha: a.parse().map_err(|_| Error::Normalizer(format!("cannot parse alpha in `{other}`")))?,
                },
                None => {
                    return Err(Error::Normalizer(format!(
                        "unknown normalizer `{other}` (softmax, entmax15, sparsemax, entmax:ALPHA)"
                    )))
                }
            },
        };
        n.validate()?;
        Ok(n)
    }

    /// Short label for reports.
    pub fn label(&self) -> String {
        match *self {
            Normalizer::Softmax => "softmax".into(),
            Normalizer::Sparsemax => "sparsemax".into(),
            Normalizer::Entmax { alpha: 1.5 } => "entmax15".into(),
            Normalizer::Entmax { alpha } => format!("entmax:{alpha}"),
        }
    }
}
