//! The sweep's picture: worst and mean held-out perplexity ratio against compute fraction,
//! one line per curve (threshold-p, top-k), other settings as points, and the
//! original model at (1, 1). Drawn with plotters into a PNG, text in the Ubuntu font that
//! `epaint_default_fonts` bundles, so that it draws on a machine without system fonts.

use super::SweepRow;
use crate::error::{Error, Result};
use plotters::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Once;

const FONT: &str = "sans-serif";
const PALETTE: [RGBColor; 6] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x8c, 0x56, 0x4b),
];

/// Draws `rows` into a PNG of `size` (width, height) pixels at `path`: x = held-out compute
/// fraction of the dense model's, y = perplexity ratio converted / original on a log scale;
/// worst ratio as filled circles on a solid line, mean ratio as hollow circles on a thin
/// line, per curve (settings sharing [`SweepSetting::curve`](super::SweepSetting::curve),
/// in order of compute); settings without a curve as points named in the legend; the
/// original model as a black cross at (1, 1).
///
/// Errors: [`Error::InvalidArgument`] for a size under 200 × 150 pixels; [`Error::Io`]
/// when drawing or writing fails.
pub fn plot_sweep(path: &Path, rows: &[SweepRow], size: (u32, u32)) -> Result<()> {
    if size.0 < 200 || size.1 < 150 {
        return Err(Error::InvalidArgument(format!(
            "plot size {}×{} is below 200×150 pixels",
            size.0, size.1
        )));
    }
    register_font();
    draw(path, rows, size).map_err(|e| Error::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    })
}

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Fails only for bytes that are not a font; these are a known-good TTF.
        let _ = plotters::style::register_font(
            FONT,
            FontStyle::Normal,
            epaint_default_fonts::UBUNTU_LIGHT,
        );
    });
}

type DrawResult = std::result::Result<(), Box<dyn std::error::Error>>;

fn draw(path: &Path, rows: &[SweepRow], size: (u32, u32)) -> DrawResult {
    let root = BitMapBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE)?;

    let points =
        |f: fn(&SweepRow) -> f64| rows.iter().map(move |r| (r.report.compute_fraction, f(r)));
    let worst = |r: &SweepRow| r.report.worst_perplexity_ratio;
    let mean = |r: &SweepRow| r.report.mean_perplexity_ratio;
    let xs = points(worst).map(|p| p.0).chain([1.0]);
    let x_min = xs.fold(1.0f64, f64::min);
    let ys = points(worst).chain(points(mean)).map(|p| p.1).chain([1.0]);
    let (y_min, y_max) = ys.fold((1.0f64, 1.0f64), |(lo, hi), y| (lo.min(y), hi.max(y)));
    let x_range = (x_min - 0.02).max(0.0)..1.01;
    let y_range = (y_min * 0.97)..(y_max * 1.25);

    let mut chart = ChartBuilder::on(&root)
        .caption("held-out perplexity ratio against compute", (FONT, 24))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(x_range, y_range.log_scale())?;
    chart
        .configure_mesh()
        .x_desc("compute, fraction of the dense model's FLOPs")
        .y_desc("perplexity ratio converted / original (log)")
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 16))
        .draw()?;

    let mut curves: BTreeMap<&str, Vec<&SweepRow>> = BTreeMap::new();
    let mut singles = Vec::new();
    for r in rows {
        match &r.setting.curve {
            Some(c) => curves.entry(c.as_str()).or_default().push(r),
            None => singles.push(r),
        }
    }
    for (i, (name, mut members)) in curves.into_iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        members.sort_by(|a, b| {
            a.report
                .compute_fraction
                .total_cmp(&b.report.compute_fraction)
        });
        for (which, f, filled) in [
            ("worst", worst as fn(&SweepRow) -> f64, true),
            ("mean", mean, false),
        ] {
            let line: Vec<(f64, f64)> = members
                .iter()
                .map(|r| (r.report.compute_fraction, f(r)))
                .collect();
            let stroke = if filled {
                color.stroke_width(2)
            } else {
                color.stroke_width(1)
            };
            chart
                .draw_series(LineSeries::new(line.clone(), stroke))?
                .label(format!("{name}, {which}"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], stroke));
            let marker = if filled {
                color.filled()
            } else {
                color.stroke_width(1)
            };
            chart.draw_series(line.into_iter().map(|p| Circle::new(p, 4, marker)))?;
        }
    }
    let offset = PALETTE.len() / 2;
    for (i, r) in singles.iter().enumerate() {
        let color = PALETTE[(offset + i) % PALETTE.len()];
        let (x, w, m) = (r.report.compute_fraction, worst(r), mean(r));
        chart.draw_series([Circle::new((x, m), 5, color.stroke_width(1))])?;
        chart
            .draw_series([Circle::new((x, w), 5, color.filled())])?
            .label(format!("{} (filled: worst, hollow: mean)", r.setting.name))
            .legend(move |(x, y)| Circle::new((x + 10, y), 4, color.filled()));
    }
    chart
        .draw_series([Cross::new((1.0, 1.0), 7, BLACK.stroke_width(2))])?
        .label("original model")
        .legend(|(x, y)| Cross::new((x + 10, y), 5, BLACK.stroke_width(2)));
    chart
        .configure_series_labels()
        // Conversions fall from the upper left to the original at (1, 1): the upper right
        // stays empty.
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
