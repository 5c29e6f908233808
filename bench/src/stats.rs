//! Medians, spreads and the number formats of the reports: pure arithmetic.

/// The median of `values` (the mean of the middle two for an even count); `None` when empty.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

/// The median and the range of a set of per-round figures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub low: f64,
    pub high: f64,
}

impl Spread {
    pub fn of(values: &[f64]) -> Option<Self> {
        let median = median(values)?;
        let low = values.iter().copied().fold(f64::INFINITY, f64::min);
        let high = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        Some(Self { median, low, high })
    }

    /// Per-round quotients `a / b` of paired figures; rounds whose `b` is not positive are
    /// left out.
    pub fn of_ratios(pairs: &[(f64, f64)]) -> Option<Self> {
        let ratios: Vec<f64> = pairs
            .iter()
            .filter(|(_, b)| *b > 0.0)
            .map(|(a, b)| a / b)
            .collect();
        Self::of(&ratios)
    }
}

/// `x` rounded to `decimals` places, as `printf "%.Nf"` would write it. Measurements are
/// kept at the precision their table prints, so that medians of them print alike.
pub fn round_to(x: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (x * scale).round() / scale
}

/// A figure quoted in running text: whole numbers without decimals, others with up to six
/// significant digits and no trailing zeros (`15.8`, `0.94`, `1560243`, `3.9`).
pub fn fmt_g(x: f64) -> String {
    if !x.is_finite() {
        return "-".into();
    }
    if x == x.trunc() && x.abs() < 1e15 {
        return format!("{x:.0}");
    }
    let magnitude = x.abs().log10().floor() as i32;
    let decimals = (5 - magnitude).clamp(0, 15) as usize;
    let text = format!("{x:.decimals$}");
    if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_of_an_odd_count_is_the_middle_value() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
    }

    #[test]
    fn the_median_of_an_even_count_is_the_mean_of_the_middle_two() {
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }

    #[test]
    fn nothing_has_no_median() {
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn a_spread_of_ratios_skips_rounds_without_a_denominator() {
        let spread = Spread::of_ratios(&[(50.0, 100.0), (60.0, 100.0), (1.0, 0.0), (55.0, 100.0)]);
        assert_eq!(
            spread,
            Some(Spread {
                median: 0.55,
                low: 0.5,
                high: 0.6
            })
        );
        assert_eq!(Spread::of_ratios(&[(1.0, 0.0)]), None);
    }

    #[test]
    fn rounding_keeps_the_printed_precision() {
        assert_eq!(round_to(15.849, 1), 15.8);
        assert_eq!(round_to(0.1234, 3), 0.123);
        assert_eq!(round_to(70900.4, 0), 70900.0);
    }

    #[test]
    fn figures_in_text_drop_trailing_zeros() {
        assert_eq!(fmt_g(15.8), "15.8");
        assert_eq!(fmt_g(3.90), "3.9");
        assert_eq!(fmt_g(1.0), "1");
        assert_eq!(fmt_g(0.0), "0");
        assert_eq!(fmt_g(1_560_243.0), "1560243");
        assert_eq!(fmt_g(0.125), "0.125");
        assert_eq!(fmt_g(15.85), "15.85");
    }
}
