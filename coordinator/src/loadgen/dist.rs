//! Token-length distributions for generated requests: `--input-len` and `--output-len`.

use grok_shared::sampling::Rng;
use std::fmt;
use std::str::FromStr;

/// Largest length accepted (no model has a longer context).
const MAX_LEN: usize = 1 << 20;

/// A distribution of positive lengths. Written `N` (always N), `uniform:LO:HI` (each length
/// in LO..=HI equally likely) or `normal:MEAN:STD` (rounded, and clamped to 1..=2·MEAN).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LengthDist {
    Fixed(usize),
    Uniform { lo: usize, hi: usize },
    Normal { mean: f64, std: f64 },
}

const FORMS: &str =
    "write N, uniform:LO:HI or normal:MEAN:STD (e.g. 128, uniform:64:256, normal:128:32)";

impl FromStr for LengthDist {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let int = |v: &str| -> Result<usize, String> {
            let n: usize = v
                .trim()
                .parse()
                .map_err(|_| format!("'{v}' is not a whole number; {FORMS}"))?;
            if n == 0 || n > MAX_LEN {
                return Err(format!("length {n} is out of range 1..={MAX_LEN}"));
            }
            Ok(n)
        };
        let num = |v: &str| -> Result<f64, String> {
            let x: f64 = v
                .trim()
                .parse()
                .map_err(|_| format!("'{v}' is not a number; {FORMS}"))?;
            if !x.is_finite() || x < 0.0 || x > MAX_LEN as f64 {
                return Err(format!("{v} is out of range 0..={MAX_LEN}"));
            }
            Ok(x)
        };
        let parts: Vec<&str> = s.split(':').collect();
        match parts.as_slice() {
            [n] => Ok(LengthDist::Fixed(int(n)?)),
            ["uniform", lo, hi] => {
                let (lo, hi) = (int(lo)?, int(hi)?);
                if lo > hi {
                    return Err(format!(
                        "uniform:{lo}:{hi}: the low end is above the high end"
                    ));
                }
                Ok(LengthDist::Uniform { lo, hi })
            }
            ["normal", mean, std] => {
                let (mean, std) = (num(mean)?, num(std)?);
                if mean < 1.0 {
                    return Err(format!("normal:{mean}:{std}: the mean must be at least 1"));
                }
                Ok(LengthDist::Normal { mean, std })
            }
            _ => Err(format!("cannot read '{s}': {FORMS}")),
        }
    }
}

impl fmt::Display for LengthDist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LengthDist::Fixed(n) => write!(f, "{n}"),
            LengthDist::Uniform { lo, hi } => write!(f, "uniform:{lo}:{hi}"),
            LengthDist::Normal { mean, std } => write!(f, "normal:{mean}:{std}"),
        }
    }
}

impl LengthDist {
    pub fn sample(&self, rng: &mut Rng) -> usize {
        match *self {
            LengthDist::Fixed(n) => n,
            LengthDist::Uniform { lo, hi } => lo + (rng.next_u64() % (hi - lo + 1) as u64) as usize,
            LengthDist::Normal { mean, std } => {
                // Box-Muller; 1 - u keeps the logarithm finite.
                let (u, v) = (1.0 - rng.next_f64(), rng.next_f64());
                let z = (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos();
                (mean + std * z).round().clamp(1.0, 2.0 * mean) as usize
            }
        }
    }

    /// The largest length it can give.
    pub fn max(&self) -> usize {
        match *self {
            LengthDist::Fixed(n) => n,
            LengthDist::Uniform { hi, .. } => hi,
            LengthDist::Normal { mean, .. } => (2.0 * mean).round() as usize,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_parse_and_print_back() {
        for s in ["128", "uniform:64:256", "normal:128:32", "normal:10.5:0"] {
            let d: LengthDist = s.parse().unwrap();
            assert_eq!(d.to_string(), s);
        }
        for bad in [
            "",
            "0",
            "-3",
            "1.5",
            "abc",
            "uniform:5:2",
            "uniform:0:4",
            "uniform:4",
            "normal:0.5:1",
            "normal:nan:1",
            "normal:10:-1",
            "poisson:3",
            "99999999999",
        ] {
            assert!(bad.parse::<LengthDist>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn samples_stay_in_range_and_follow_the_shape() {
        let mut rng = Rng::new(7);
        let u: LengthDist = "uniform:3:6".parse().unwrap();
        let mut seen = [0usize; 7];
        for _ in 0..4000 {
            let x = u.sample(&mut rng);
            assert!((3..=6).contains(&x));
            seen[x] += 1;
        }
        assert!(seen[3..].iter().all(|&c| c > 800), "{seen:?}");
        let n: LengthDist = "normal:100:10".parse().unwrap();
        let xs: Vec<f64> = (0..4000).map(|_| n.sample(&mut rng) as f64).collect();
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let sd = (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64).sqrt();
        assert!(
            (mean - 100.0).abs() < 1.0 && (sd - 10.0).abs() < 1.0,
            "{mean} {sd}"
        );
        assert!(xs.iter().all(|&x| (1.0..=200.0).contains(&x)));
        assert_eq!(LengthDist::Fixed(9).sample(&mut rng), 9);
    }
}
