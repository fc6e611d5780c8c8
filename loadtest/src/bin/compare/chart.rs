//! Grouped bar charts as PNG, drawn with plotters' bitmap backend. Text is rendered with
//! ab_glyph from a TTF file loaded at run time (DejaVu Sans by default), so no fontconfig or
//! FreeType is needed.

use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::FontStyle;

/// Font files tried in order (Debian's fonts-dejavu-core ships the first).
const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

/// Registers a font once; `Err` says why charts cannot be drawn.
pub fn init_font() -> Result<(), String> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let env = std::env::var("COMPARE_FONT").ok();
        let candidates = env.iter().map(String::as_str).chain(FONTS.iter().copied());
        for p in candidates {
            if let Ok(bytes) = std::fs::read(p) {
                // plotters keeps a 'static reference for the life of the process.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return Ok(());
                }
            }
        }
        Err(format!(
            "no usable TTF font (tried {}; set COMPARE_FONT or install fonts-dejavu-core)",
            FONTS.join(", ")
        ))
    })
    .clone()
}

/// Colour of each server, stable across charts.
pub fn color_of(server: &str) -> RGBColor {
    match server {
        "ringtftpd" => RGBColor(214, 39, 40),
        "tftpd-hpa" => RGBColor(31, 119, 180),
        "atftpd" => RGBColor(44, 160, 44),
        "dnsmasq" => RGBColor(255, 127, 14),
        _ => RGBColor(127, 127, 127),
    }
}

/// One series: a server and its value per category (`None`: not measured).
pub struct Series {
    pub name: String,
    pub values: Vec<Option<f64>>,
}

fn label(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Draws `series` as groups of bars, one group per category. With `log`, the y axis is
/// logarithmic (for figures spanning decades, such as CPU per GB).
pub fn grouped_bars(
    path: &Path,
    title: &str,
    y_label: &str,
    categories: &[String],
    series: &[Series],
    log: bool,
) -> Result<(), String> {
    init_font()?;
    let err = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    let values: Vec<f64> = series
        .iter()
        .flat_map(|s| s.values.iter().flatten().copied())
        .filter(|v| v.is_finite() && *v > 0.0)
        .collect();
    if values.is_empty() || categories.is_empty() {
        return Err(format!("{}: nothing to draw", path.display()));
    }
    let tf = |v: f64| if log { v.log10() } else { v };
    let hi = values.iter().copied().fold(f64::MIN, f64::max);
    let lo = values.iter().copied().fold(f64::MAX, f64::min);
    let (y0, y1) = if log {
        ((lo.log10() - 0.3).floor(), (hi.log10() + 0.3).ceil())
    } else {
        (0.0, hi * 1.15)
    };

    let root = BitMapBackend::new(path, (1000, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let ncat = categories.len() as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..ncat, y0..y1)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .disable_x_axis()
        .y_desc(y_label)
        .y_label_formatter(&|v| {
            if log {
                // Decades: 0.1, 1, 10, 100…
                let x = 10f64.powf(*v);
                if x >= 1.0 {
                    format!("{x:.0}")
                } else {
                    format!("{x}")
                }
            } else {
                label(*v)
            }
        })
        .y_labels(if log { (y1 - y0) as usize + 1 } else { 8 })
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(|e| err(&e))?;

    let k = series.len().max(1) as f64;
    let group = 0.8;
    let w = group / k;
    for (si, s) in series.iter().enumerate() {
        let color = color_of(&s.name);
        for (ci, v) in s.values.iter().enumerate() {
            let Some(v) = v.filter(|v| v.is_finite() && *v > 0.0) else {
                continue;
            };
            let x0 = ci as f64 + (1.0 - group) / 2.0 + si as f64 * w;
            let top = tf(v);
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(x0, y0), (x0 + w * 0.92, top)],
                    color.filled(),
                )))
                .map_err(|e| err(&e))?;
            chart
                .draw_series(std::iter::once(Text::new(
                    label(v),
                    (x0, top + (y1 - y0) * 0.035),
                    ("sans-serif", 12),
                )))
                .map_err(|e| err(&e))?;
        }
        // Legend entry.
        chart
            .draw_series(std::iter::empty::<Rectangle<(f64, f64)>>())
            .map_err(|e| err(&e))?
            .label(s.name.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
    }
    // Category names under each group, in pixel coordinates.
    for (ci, c) in categories.iter().enumerate() {
        let (px, py) = chart.backend_coord(&(ci as f64 + 0.5, y0));
        root.draw(&Text::new(
            c.clone(),
            (px - 6 * c.chars().count() as i32 / 2, py + 10),
            ("sans-serif", 16),
        ))
        .map_err(|e| err(&e))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.85))
        .label_font(("sans-serif", 15))
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_a_png_or_says_why_not() {
        let dir = std::env::temp_dir().join(format!("chart-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("c.png");
        let series = vec![
            Series {
                name: "ringtftpd".into(),
                values: vec![Some(10.0), Some(1000.0)],
            },
            Series {
                name: "dnsmasq".into(),
                values: vec![None, Some(5.0)],
            },
        ];
        let cats = vec!["S1".to_string(), "S2".to_string()];
        match init_font() {
            Ok(()) => {
                grouped_bars(&p, "t", "y", &cats, &series, true).unwrap();
                let bytes = std::fs::read(&p).unwrap();
                assert_eq!(&bytes[1..4], b"PNG");
                grouped_bars(&p, "t", "y", &cats, &series, false).unwrap();
            }
            Err(e) => {
                // No font on this machine: the error must say so, and drawing must refuse.
                assert!(e.contains("font"), "{e}");
                assert!(grouped_bars(&p, "t", "y", &cats, &series, false).is_err());
            }
        }
        let empty = vec![Series {
            name: "x".into(),
            values: vec![None],
        }];
        assert!(grouped_bars(&p, "t", "y", &cats[..1], &empty, false).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
