//! Statistics, the JSON file, the PNG plot and the summary table of a scenario.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use plotters::prelude::*;
use serde::Serialize;

/// Which statistic a target applies to.
#[derive(Clone, Copy, Debug, Serialize)]
pub enum Stat {
    P95,
    Max,
}

/// A figure must be at most `limit` (in the row's unit) at `stat`.
#[derive(Clone, Debug, Serialize)]
pub struct Target {
    pub stat: Stat,
    pub limit: f64,
}

/// p50/p95/max of samples (nearest rank).
#[derive(Clone, Debug, Serialize, Default)]
pub struct Summary {
    pub n: usize,
    pub min: f64,
    pub p50: f64,
    pub p95: f64,
    pub max: f64,
    pub mean: f64,
}

pub fn summarize(samples: &[f64]) -> Summary {
    let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return Summary::default();
    }
    v.sort_by(f64::total_cmp);
    let rank = |p: f64| {
        let idx = ((p * v.len() as f64).ceil() as usize).saturating_sub(1);
        v[idx.min(v.len() - 1)]
    };
    Summary {
        n: v.len(),
        min: v[0],
        p50: rank(0.50),
        p95: rank(0.95),
        max: v[v.len() - 1],
        mean: v.iter().sum::<f64>() / v.len() as f64,
    }
}

/// One measured figure.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub name: String,
    pub unit: String,
    pub samples: Vec<f64>,
    pub summary: Summary,
    pub target: Option<Target>,
    /// `None` without a target or without samples.
    pub met: Option<bool>,
    /// Repetitions that did not reach the condition in time.
    pub timeouts: usize,
}

impl Row {
    pub fn new(
        name: impl Into<String>,
        unit: &str,
        samples: Vec<f64>,
        target: Option<Target>,
    ) -> Row {
        Self::with_timeouts(name, unit, samples, target, 0)
    }

    pub fn with_timeouts(
        name: impl Into<String>,
        unit: &str,
        samples: Vec<f64>,
        target: Option<Target>,
        timeouts: usize,
    ) -> Row {
        let summary = summarize(&samples);
        let met = target.as_ref().filter(|_| summary.n > 0).map(|t| {
            let v = match t.stat {
                Stat::P95 => summary.p95,
                Stat::Max => summary.max,
            };
            v <= t.limit && timeouts == 0
        });
        Row {
            name: name.into(),
            unit: unit.into(),
            samples,
            summary,
            target,
            met,
            timeouts,
        }
    }
}

/// What a scenario produces.
#[derive(Debug, Serialize)]
pub struct Report {
    pub scenario: String,
    pub started_unix: u64,
    pub duration_s: f64,
    pub machine: serde_json::Value,
    pub settings: serde_json::Value,
    pub rows: Vec<Row>,
    pub extra: serde_json::Value,
    pub notes: Vec<String>,
}

/// A plot: named series of (x, y) points.
pub struct Plot {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<(String, Vec<(f64, f64)>)>,
}

impl Report {
    /// Writes `<dir>/<scenario>.json` and `.png` and prints the table.
    pub fn finish(&self, dir: &Path, plot: &Plot) -> Result<(PathBuf, PathBuf)> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let json = dir.join(format!("{}.json", self.scenario));
        std::fs::write(&json, serde_json::to_string_pretty(self)?)
            .with_context(|| format!("writing {}", json.display()))?;
        let png = dir.join(format!("{}.png", self.scenario));
        if let Err(e) = draw(&png, plot) {
            eprintln!("warning: plot {}: {e:#}", png.display());
        }
        self.print();
        println!("wrote {} and {}", json.display(), png.display());
        Ok((json, png))
    }

    pub fn print(&self) {
        println!("\n== {} ({:.0}s) ==", self.scenario, self.duration_s);
        println!(
            "{:<58} {:>5} {:>10} {:>10} {:>10}  {:<6} {:<14} met",
            "figure", "n", "p50", "p95", "max", "unit", "target"
        );
        for r in &self.rows {
            let target = r
                .target
                .as_ref()
                .map(|t| format!("{:?} <= {}", t.stat, fmt(t.limit)))
                .unwrap_or_else(|| "-".into());
            let met = match r.met {
                Some(true) => "yes".to_string(),
                Some(false) => "NO".to_string(),
                None => "-".to_string(),
            };
            let timeouts = if r.timeouts > 0 {
                format!(" ({} timed out)", r.timeouts)
            } else {
                String::new()
            };
            println!(
                "{:<58} {:>5} {:>10} {:>10} {:>10}  {:<6} {:<14} {}{}",
                r.name,
                r.summary.n,
                fmt(r.summary.p50),
                fmt(r.summary.p95),
                fmt(r.summary.max),
                r.unit,
                target,
                met,
                timeouts
            );
        }
        for n in &self.notes {
            println!("note: {n}");
        }
    }
}

fn fmt(v: f64) -> String {
    if v == 0.0 || v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// Registers DejaVu Sans for labels when the machine has it; without it the plot has no text.
fn have_font() -> bool {
    static FONT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FONT.get_or_init(|| {
        let paths = [
            "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/TTF/DejaVuSans.ttf",
            "/usr/share/fonts/dejavu/DejaVuSans.ttf",
        ];
        for p in paths {
            if let Ok(bytes) = std::fs::read(p) {
                // plotters keeps registered fonts for the whole process.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        false
    })
}

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn draw(path: &Path, plot: &Plot) -> Result<()> {
    let text = have_font();
    let root = BitMapBackend::new(path, (1000, 620)).into_drawing_area();
    root.fill(&WHITE)?;
    let points = plot.series.iter().flat_map(|(_, p)| p.iter());
    let (mut x_max, mut y_max) = (1.0f64, 0.0f64);
    for (x, y) in points {
        x_max = x_max.max(*x);
        y_max = y_max.max(*y);
    }
    let y_max = if y_max <= 0.0 { 1.0 } else { y_max * 1.1 };
    let mut builder = ChartBuilder::on(&root);
    builder
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70);
    if text {
        builder.caption(&plot.title, ("sans-serif", 22));
    }
    let mut chart = builder.build_cartesian_2d(0f64..x_max * 1.05, 0f64..y_max)?;
    let mut mesh = chart.configure_mesh();
    if text {
        mesh.x_desc(plot.x_label.as_str())
            .y_desc(plot.y_label.as_str());
    } else {
        mesh.disable_x_axis().disable_y_axis();
    }
    mesh.draw()?;
    for (i, (name, pts)) in plot.series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let mut sorted = pts.clone();
        sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
        let s = chart.draw_series(LineSeries::new(sorted.clone(), color.stroke_width(1)))?;
        if text {
            s.label(name.as_str()).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(3))
            });
        }
        chart.draw_series(sorted.iter().map(|p| Circle::new(*p, 3, color.filled())))?;
    }
    if text {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .label_font(("sans-serif", 14))
            .draw()?;
    }
    root.present()?;
    Ok(())
}

/// Series of one row per repetition: x = repetition, y = sample.
pub fn per_rep(rows: &[&Row]) -> Vec<(String, Vec<(f64, f64)>)> {
    rows.iter()
        .map(|r| {
            (
                format!("{} ({})", r.name, r.unit),
                r.samples
                    .iter()
                    .enumerate()
                    .map(|(i, y)| ((i + 1) as f64, *y))
                    .collect(),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        let s = summarize(&v);
        assert_eq!((s.p50, s.p95, s.max, s.n), (10.0, 19.0, 20.0, 20));
        let one = summarize(&[3.0]);
        assert_eq!((one.p50, one.p95, one.max), (3.0, 3.0, 3.0));
        assert_eq!(summarize(&[]).n, 0);
    }

    #[test]
    fn target_needs_every_repetition() {
        let t = || {
            Some(Target {
                stat: Stat::P95,
                limit: 1.0,
            })
        };
        assert_eq!(Row::new("a", "s", vec![0.5, 0.7], t()).met, Some(true));
        assert_eq!(Row::new("a", "s", vec![0.5, 1.7], t()).met, Some(false));
        assert_eq!(
            Row::with_timeouts("a", "s", vec![0.5], t(), 1).met,
            Some(false)
        );
        assert_eq!(Row::new("a", "s", vec![], t()).met, None);
    }

    #[test]
    fn plot_writes_png() {
        let dir = std::env::temp_dir().join(format!("verge-bench-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("p.png");
        let plot = Plot {
            title: "t".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            series: vec![("a".into(), vec![(1.0, 2.0), (2.0, 3.0)])],
        };
        draw(&path, &plot).unwrap();
        assert!(std::fs::metadata(&path).unwrap().len() > 1000);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
