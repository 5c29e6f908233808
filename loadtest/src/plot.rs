//! Admitted and rejected responses per second, drawn as a PNG.
//!
//! Plotters' `ab_glyph` text needs no system font library, only a font file: the one
//! given with `--font`, or a common system one.

use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};
use plotters::prelude::*;

use loadtest::summary::Second;

const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
];

fn load_font(chosen: Option<&Path>) -> anyhow::Result<()> {
    let path: PathBuf = match chosen {
        Some(path) => path.to_owned(),
        None => FONT_CANDIDATES
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .ok_or_else(|| {
                anyhow!(
                    "no TrueType font found for the plot's text; pass --font FILE (Debian: apt-get install fonts-dejavu-core)"
                )
            })?,
    };
    let bytes =
        std::fs::read(&path).with_context(|| format!("cannot read the font {}", path.display()))?;
    // Plotters keeps registered fonts for the life of the process.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow!("{} is not a usable TrueType font", path.display()))
}

/// Draws the timeline to `path`. Series for 5xx and errors appear only when there were any.
pub fn draw(
    path: &Path,
    timeline: &[Second],
    title: &str,
    font: Option<&Path>,
) -> anyhow::Result<()> {
    load_font(font)?;
    let draw_error = |e: DrawingAreaErrorKind<_>| anyhow!("cannot draw {}: {e}", path.display());
    let root = BitMapBackend::new(path, (1200, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_error)?;
    let seconds = timeline.len().max(1) as f64;
    let peak = timeline
        .iter()
        .map(|s| {
            s.admitted
                .max(s.rejected)
                .max(s.server_errors)
                .max(s.errors)
        })
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..seconds, 0f64..peak * 1.3)
        .map_err(draw_error)?;
    chart
        .configure_mesh()
        .x_desc("seconds since the start (answers by the second they arrived in)")
        .y_desc("responses per second")
        .y_label_formatter(&|y| format!("{y:.0}"))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .label_style(("sans-serif", 16))
        .axis_desc_style(("sans-serif", 18))
        .draw()
        .map_err(draw_error)?;
    /// One line of the chart; 5xx and errors are drawn only when there were any.
    struct Series {
        label: &'static str,
        colour: RGBColor,
        count: fn(&Second) -> u64,
        always: bool,
    }
    let all = [
        Series {
            label: "admitted (200)",
            colour: RGBColor(0, 150, 60),
            count: |s| s.admitted,
            always: true,
        },
        Series {
            label: "rejected (429)",
            colour: RGBColor(210, 40, 40),
            count: |s| s.rejected,
            always: true,
        },
        Series {
            label: "5xx",
            colour: RGBColor(230, 140, 0),
            count: |s| s.server_errors,
            always: false,
        },
        Series {
            label: "errors",
            colour: RGBColor(90, 90, 90),
            count: |s| s.errors,
            always: false,
        },
    ];
    for Series {
        label,
        colour,
        count,
        always,
    } in all
    {
        if !always && timeline.iter().all(|s| count(s) == 0) {
            continue;
        }
        // A step line: each second's count held across that second.
        let points = timeline.iter().enumerate().flat_map(|(i, s)| {
            let y = count(s) as f64;
            [(i as f64, y), (i as f64 + 1.0, y)]
        });
        chart
            .draw_series(LineSeries::new(points, colour.stroke_width(3)))
            .map_err(draw_error)?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], colour.stroke_width(3))
            });
    }
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(draw_error)?;
    root.present().map_err(draw_error)?;
    Ok(())
}
