//! Server-side SVG charts for the console's overview.
//!
//! Two kinds of chart, both rendered here as inline `<svg>` with `maud`:
//! - [`bars`]: a horizontal bar chart, one row per item (label on the left,
//!   the bar, its value at the end of the bar), e.g. statements per role or
//!   refusals per reason (`alert`);
//! - [`series`]: a column chart over time, x labels given in order (such as
//!   `"14:05"`), y axis from 0 to a "nice" maximum ([`nice_max`]) with a few
//!   labelled gridlines.
//!
//! Why on the server: the console ships no chart library, loads nothing from a
//! CDN and runs no JavaScript for these; the page works as plain HTML. Its
//! Content-Security-Policy forbids inline styles, so nothing here writes a
//! `style` attribute or a `<style>` element: the drawing uses SVG
//! presentation attributes (`fill`, `stroke`, `font-size`, ...) as defaults,
//! and class names the console's external stylesheet can override
//! (presentation attributes lose to any CSS rule):
//! - `chart`: the `<svg>` element;
//! - `chart-bar`, `chart-bar-alert`: bars and columns (alert: refusals);
//! - `chart-line`: the horizontal gridlines of [`series`];
//! - `chart-axis`: the axis lines of [`series`];
//! - `chart-label`: all text (item labels, values, axis labels);
//! - `chart-empty`: the "nothing yet" paragraph of [`bars`] and the
//!   "no statements in this period" note of [`series`].
//!
//! Accessibility: the `<svg>` has `role="img"` and `aria-labelledby` naming its
//! `<title>` (the chart's title) and `<desc>` (a one-sentence summary), with
//! ids derived from the caller's `id`, which must be unique in the page. Every
//! bar and column carries a `<title>` child with its label and exact value, so
//! hovering shows it.
//!
//! Layout: a fixed `viewBox` with `width="100%"` and no pixel size, so a chart
//! scales with its container (text scales with it). Coordinates are computed
//! in f64 and printed with at most one decimal. All caller text (labels, title,
//! id) goes through maud's escaping; nothing here uses `PreEscaped`.

use maud::{Markup, html};

/// Width of every chart's `viewBox`, in user units.
const WIDTH: f64 = 600.0;

// Bar chart geometry.
/// Height of one row of [`bars`].
const ROW_H: f64 = 24.0;
/// Height of a bar within its row.
const BAR_H: f64 = 16.0;
/// Space above the first row and below the last.
const BARS_PAD: f64 = 4.0;
/// Width of the label column; labels end a little before it.
const LABEL_W: f64 = 160.0;
/// Labels longer than this many characters are cut, ending with an ellipsis.
const LABEL_CHARS: usize = 22;

// Series geometry: the plot area is inside these margins.
const SERIES_H: f64 = 220.0;
const MARGIN_LEFT: f64 = 48.0;
const MARGIN_RIGHT: f64 = 12.0;
const MARGIN_TOP: f64 = 12.0;
const MARGIN_BOTTOM: f64 = 28.0;
/// At most this many x labels are shown, evenly spaced, so they don't overlap.
const MAX_X_LABELS: usize = 8;
/// X labels longer than this many characters are cut.
const X_LABEL_CHARS: usize = 10;
/// A column is never wider than this, however few points there are.
const MAX_COLUMN_W: f64 = 40.0;

// Default colours, overridden by the stylesheet through the classes above.
const BAR_FILL: &str = "#4a78c2";
const ALERT_FILL: &str = "#c2454a";
const AXIS_STROKE: &str = "#888888";
const GRID_STROKE: &str = "#dddddd";
const TEXT_FILL: &str = "currentColor";

/// The smallest "nice" number (1, 2 or 5 × 10^k) that is at least `v`, and at
/// least 1: the top of a y axis. Above the largest such number a u64 holds
/// (10^19), returns `u64::MAX`.
pub fn nice_max(v: u64) -> u64 {
    let mut magnitude: u64 = 1;
    loop {
        for factor in [1, 2, 5] {
            match magnitude.checked_mul(factor) {
                Some(nice) if nice >= v => return nice,
                Some(_) => {}
                None => return u64::MAX,
            }
        }
        match magnitude.checked_mul(10) {
            Some(next) => magnitude = next,
            None => return u64::MAX,
        }
    }
}

/// A horizontal bar chart: one row per item, its label on the left, its value
/// at the end of its bar; the longest bar is the largest value. `alert` draws
/// the bars with class `chart-bar-alert` (refusals). With no items, a
/// `<p class="chart-empty">` saying "nothing yet" instead of an empty drawing.
pub fn bars(id: &str, title: &str, items: &[(String, u64)], alert: bool) -> Markup {
    if items.is_empty() {
        return html! { p class="chart-empty" { "nothing yet" } };
    }

    let max = items.iter().map(|(_, v)| *v).max().unwrap_or(0);
    // Room for the value after the longest bar: about 7 units per digit.
    let value_w = max.to_string().len() as f64 * 7.0 + 12.0;
    let bar_area = WIDTH - LABEL_W - value_w;
    let height = items.len() as f64 * ROW_H + 2.0 * BARS_PAD;
    let (class, fill) = if alert {
        ("chart-bar chart-bar-alert", ALERT_FILL)
    } else {
        ("chart-bar", BAR_FILL)
    };

    let (top_label, top_value) = items
        .iter()
        .max_by_key(|(_, v)| *v)
        .map(|(l, v)| (l.as_str(), *v))
        .unwrap_or_default();
    let desc = format!(
        "{} {}; the largest is {} with {}.",
        items.len(),
        if items.len() == 1 { "item" } else { "items" },
        top_label,
        top_value
    );

    html! {
        (svg_open(id, title, &desc, height, html! {
            @for (i, (label, value)) in items.iter().enumerate() {
                @let y = BARS_PAD + i as f64 * ROW_H;
                @let w = bar_width(*value, max, bar_area);
                // The row's text sits on the bar's vertical middle.
                @let text_y = y + ROW_H / 2.0;
                g {
                    title { (label) ": " (value) }
                    text class="chart-label" x=(num(LABEL_W - 8.0)) y=(num(text_y))
                        text-anchor="end" dominant-baseline="middle"
                        font-size="12" fill=(TEXT_FILL) {
                        (truncate(label, LABEL_CHARS))
                    }
                    rect class=(class) x=(num(LABEL_W)) y=(num(y + (ROW_H - BAR_H) / 2.0))
                        width=(num(w)) height=(num(BAR_H)) fill=(fill) {}
                    text class="chart-label" x=(num(LABEL_W + w + 6.0)) y=(num(text_y))
                        dominant-baseline="middle" font-size="12" fill=(TEXT_FILL) {
                        (value)
                    }
                }
            }
        }))
    }
}

/// A column chart over time: one column per point, in the order given, x
/// labels under them (at most 8, evenly spaced), and a y axis from 0 to
/// [`nice_max`] of the largest value with 3 to 5 labelled gridlines (fewer
/// when the maximum is 1 or 2, as labels are whole numbers). With no points,
/// or only zeros, the axes are still drawn, with a "no statements in this
/// period" note.
pub fn series(id: &str, title: &str, points: &[(String, u64)]) -> Markup {
    let plot_w = WIDTH - MARGIN_LEFT - MARGIN_RIGHT;
    let plot_h = SERIES_H - MARGIN_TOP - MARGIN_BOTTOM;
    let bottom = MARGIN_TOP + plot_h;

    let max = points.iter().map(|(_, v)| *v).max().unwrap_or(0);
    let top = nice_max(max);
    let empty = max == 0;
    // Height of a value on the plot (y grows downwards in SVG).
    let y_of = |v: u64| bottom - v as f64 / top as f64 * plot_h;

    let ticks = y_ticks(top);

    // Each point has a slot of equal width; its column is centred in it.
    let slot = if points.is_empty() {
        plot_w
    } else {
        plot_w / points.len() as f64
    };
    let column_w = (slot * 0.7).min(MAX_COLUMN_W);
    // Every `label_every`th point is labelled: at most MAX_X_LABELS labels.
    let label_every = points.len().div_ceil(MAX_X_LABELS).max(1);

    let desc = if empty {
        "No statements in this period.".to_string()
    } else {
        let total: u128 = points.iter().map(|(_, v)| u128::from(*v)).sum();
        let (peak_label, _) = points
            .iter()
            .find(|(_, v)| *v == max)
            .map(|(l, v)| (l.as_str(), *v))
            .unwrap_or_default();
        format!(
            "{} points from {} to {}; total {}, peak {} at {}.",
            points.len(),
            points[0].0,
            points[points.len() - 1].0,
            total,
            max,
            peak_label
        )
    };

    html! {
        (svg_open(id, title, &desc, SERIES_H, html! {
            // Gridlines with their labels, then the axes over them.
            @for tick in &ticks {
                @let y = y_of(*tick);
                line class="chart-line" x1=(num(MARGIN_LEFT)) y1=(num(y))
                    x2=(num(MARGIN_LEFT + plot_w)) y2=(num(y))
                    stroke=(GRID_STROKE) stroke-width="1" {}
                text class="chart-label" x=(num(MARGIN_LEFT - 6.0)) y=(num(y))
                    text-anchor="end" dominant-baseline="middle"
                    font-size="11" fill=(TEXT_FILL) {
                    (compact(*tick))
                }
            }
            text class="chart-label" x=(num(MARGIN_LEFT - 6.0)) y=(num(bottom))
                text-anchor="end" dominant-baseline="middle"
                font-size="11" fill=(TEXT_FILL) { "0" }
            line class="chart-axis" x1=(num(MARGIN_LEFT)) y1=(num(MARGIN_TOP))
                x2=(num(MARGIN_LEFT)) y2=(num(bottom))
                stroke=(AXIS_STROKE) stroke-width="1" {}
            line class="chart-axis" x1=(num(MARGIN_LEFT)) y1=(num(bottom))
                x2=(num(MARGIN_LEFT + plot_w)) y2=(num(bottom))
                stroke=(AXIS_STROKE) stroke-width="1" {}

            @for (i, (label, value)) in points.iter().enumerate() {
                @let centre = MARGIN_LEFT + slot * (i as f64 + 0.5);
                @let y = y_of(*value);
                g {
                    title { (label) ": " (value) }
                    rect class="chart-bar" x=(num(centre - column_w / 2.0)) y=(num(y))
                        width=(num(column_w)) height=(num(bottom - y)) fill=(BAR_FILL) {}
                }
                @if i % label_every == 0 {
                    text class="chart-label" x=(num(centre)) y=(num(bottom + 16.0))
                        text-anchor="middle" font-size="11" fill=(TEXT_FILL) {
                        (truncate(label, X_LABEL_CHARS))
                    }
                }
            }

            @if empty {
                text class="chart-empty" x=(num(MARGIN_LEFT + plot_w / 2.0))
                    y=(num(MARGIN_TOP + plot_h / 2.0))
                    text-anchor="middle" dominant-baseline="middle"
                    font-size="13" fill=(TEXT_FILL) {
                    "no statements in this period"
                }
            }
        }))
    }
}

/// The `<svg>` element shared by both charts, around `body`: responsive
/// (`viewBox`, `width="100%"`), `role="img"`, named by its `<title>` and
/// described by its `<desc>`.
fn svg_open(id: &str, title: &str, desc: &str, height: f64, body: Markup) -> Markup {
    let title_id = format!("{id}-title");
    let desc_id = format!("{id}-desc");
    html! {
        svg class="chart" xmlns="http://www.w3.org/2000/svg"
            viewBox={ "0 0 " (num(WIDTH)) " " (num(height)) }
            width="100%" role="img" aria-labelledby={ (title_id) " " (desc_id) } {
            title id=(title_id) { (title) }
            desc id=(desc_id) { (desc) }
            (body)
        }
    }
}

/// The gridline values of a y axis from 0 to `top` (a [`nice_max`]), without
/// 0: 4 or 5 evenly spaced whole numbers (1, 2 or 5 gridlines for tops
/// too small to divide: 1, 2).
fn y_ticks(top: u64) -> Vec<u64> {
    // 1×10^k and 5×10^k divide in 5; 2×10^k in 4.
    let leading = top / 10u64.pow(top.ilog10());
    let divisions = if leading == 2 { 4 } else { 5 };
    let step = if top.is_multiple_of(divisions) {
        top / divisions
    } else {
        1
    };
    (1..=top / step).map(|i| i * step).collect()
}

/// The width of the bar for `value` when `max` fills `area`; a non-zero value
/// is always at least 1 unit wide, so it is visible.
fn bar_width(value: u64, max: u64, area: f64) -> f64 {
    if value == 0 || max == 0 {
        0.0
    } else {
        (value as f64 / max as f64 * area).max(1.0)
    }
}

/// `text` cut to at most `max` characters, the last one an ellipsis.
fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_string()
    } else {
        let mut cut: String = text.chars().take(max.saturating_sub(1)).collect();
        cut.push('…');
        cut
    }
}

/// A coordinate with at most one decimal, and none when it is whole.
fn num(v: f64) -> String {
    let rounded = (v * 10.0).round() / 10.0;
    if rounded.fract() == 0.0 {
        format!("{}", rounded as i64)
    } else {
        format!("{rounded:.1}")
    }
}

/// An axis label: whole numbers below 1000, then k, M, G, ... with at most
/// one decimal (the exact values are in the columns' titles).
fn compact(v: u64) -> String {
    const UNITS: [&str; 6] = ["k", "M", "G", "T", "P", "E"];
    if v < 1000 {
        return v.to_string();
    }
    let mut scaled = v as f64;
    let mut unit = "";
    for u in UNITS {
        if scaled < 1000.0 {
            break;
        }
        scaled /= 1000.0;
        unit = u;
    }
    format!("{}{unit}", num(scaled))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(pairs: &[(&str, u64)]) -> Vec<(String, u64)> {
        pairs.iter().map(|(l, v)| (l.to_string(), *v)).collect()
    }

    /// The value of attribute `name` on the first element that has it.
    fn attr<'a>(html: &'a str, name: &str) -> &'a str {
        let start = html.find(&format!(" {name}=\"")).expect(name) + name.len() + 3;
        let end = start + html[start..].find('"').unwrap();
        &html[start..end]
    }

    fn assert_no_inline_style(html: &str) {
        assert!(!html.contains("style="), "inline style in {html}");
        assert!(!html.contains("<style"), "style element in {html}");
    }

    /// The svg is an image named by its title and described by its desc.
    fn assert_labelled(html: &str, id: &str) {
        assert!(html.contains("role=\"img\""), "{html}");
        let ids: Vec<&str> = attr(html, "aria-labelledby").split(' ').collect();
        assert_eq!(ids, [format!("{id}-title"), format!("{id}-desc")]);
        assert!(
            html.contains(&format!("<title id=\"{}\">", ids[0])),
            "{html}"
        );
        assert!(
            html.contains(&format!("<desc id=\"{}\">", ids[1])),
            "{html}"
        );
    }

    #[test]
    fn nice_max_rounds_up_to_1_2_5() {
        let cases = [
            (0, 1),
            (1, 1),
            (2, 2),
            (3, 5),
            (7, 10),
            (10, 10),
            (11, 20),
            (101, 200),
            (499, 500),
            (4999, 5000),
            (5001, 10_000),
            (10_000_000_000_000_000_000, 10_000_000_000_000_000_000),
            (u64::MAX, u64::MAX),
        ];
        for (v, nice) in cases {
            assert_eq!(nice_max(v), nice, "nice_max({v})");
        }
    }

    #[test]
    fn bars_escape_labels() {
        let html = bars(
            "c",
            "<b>roles</b>",
            &items(&[("<script>alert(1)</script>", 3)]),
            false,
        )
        .into_string();
        assert!(html.contains("&lt;script&gt;"), "{html}");
        assert!(!html.contains("<script"), "{html}");
        assert!(!html.contains("<b>"), "{html}");
    }

    #[test]
    fn bars_one_rect_per_item_with_values_in_titles() {
        let data = items(&[("alice", 12), ("bob", 7), ("carol", 0), ("dave", 123_456)]);
        let html = bars("by-role", "Statements by role", &data, false).into_string();
        assert_eq!(html.matches("<rect class=\"chart-bar").count(), data.len());
        assert!(!html.contains("chart-bar-alert"));
        for (label, value) in &data {
            assert!(
                html.contains(&format!("<title>{label}: {value}</title>")),
                "{html}"
            );
        }
        assert_labelled(&html, "by-role");
        assert!(html.contains("viewBox=\"0 0 600 "), "{html}");
        assert!(html.contains("width=\"100%\""), "{html}");
        assert_no_inline_style(&html);
    }

    #[test]
    fn bars_alert_uses_the_alert_class() {
        let data = items(&[("expired", 2), ("no grant", 5)]);
        let html = bars("refusals", "Refusals", &data, true).into_string();
        assert_eq!(
            html.matches("<rect class=\"chart-bar chart-bar-alert\"")
                .count(),
            2
        );
        assert_no_inline_style(&html);
    }

    #[test]
    fn bars_truncate_long_labels_but_keep_them_in_the_title() {
        let long = "a-very-long-role-name-that-goes-on-and-on";
        let html = bars("c", "t", &items(&[(long, 1)]), false).into_string();
        assert!(
            html.contains(&format!("<title>{long}: 1</title>")),
            "{html}"
        );
        let cut: String = long.chars().take(LABEL_CHARS - 1).collect();
        assert!(html.contains(&format!(">{cut}…</text>")), "{html}");
    }

    #[test]
    fn bars_empty_says_nothing_yet() {
        let html = bars("c", "t", &[], false).into_string();
        assert_eq!(html, "<p class=\"chart-empty\">nothing yet</p>");
    }

    #[test]
    fn series_shows_at_most_8_x_labels() {
        for n in [1, 5, 8, 9, 17, 60, 61, 1440] {
            let points: Vec<(String, u64)> = (0..n)
                .map(|i| (format!("t{i}"), (i as u64 * 7) % 23))
                .collect();
            let html = series("per-minute", "Statements per minute", &points).into_string();
            let x_labels = html
                .matches("text-anchor=\"middle\" font-size=\"11\"")
                .count();
            assert!(x_labels <= MAX_X_LABELS, "{n} points: {x_labels} labels");
            assert!(
                x_labels >= n.min(MAX_X_LABELS) / 2,
                "{n} points: {x_labels} labels"
            );
            assert_eq!(html.matches("<rect class=\"chart-bar\"").count(), n);
            assert_labelled(&html, "per-minute");
            assert_no_inline_style(&html);
        }
    }

    #[test]
    fn series_values_in_titles_and_nice_axis() {
        let points = items(&[("14:05", 3), ("14:06", 17), ("14:07", 0)]);
        let html = series("s", "t", &points).into_string();
        for (label, value) in &points {
            assert!(
                html.contains(&format!("<title>{label}: {value}</title>")),
                "{html}"
            );
        }
        // 17 → axis to 20, gridlines every 5.
        for tick in ["5", "10", "15", "20"] {
            assert!(html.contains(&format!(">{tick}</text>")), "{html}");
        }
        assert_eq!(html.matches("class=\"chart-line\"").count(), 4);
        assert!(!html.contains("no statements in this period"));
    }

    #[test]
    fn series_empty_or_zero_draws_axes_and_a_note() {
        let zeros = items(&[("14:05", 0), ("14:06", 0)]);
        for points in [&[][..], &zeros[..]] {
            let html = series("s", "t", points).into_string();
            assert!(html.contains("no statements in this period"), "{html}");
            assert_eq!(html.matches("class=\"chart-axis\"").count(), 2, "{html}");
            assert_labelled(&html, "s");
            assert_no_inline_style(&html);
        }
    }

    #[test]
    fn y_ticks_are_3_to_5_whole_numbers() {
        assert_eq!(y_ticks(1), [1]);
        assert_eq!(y_ticks(2), [1, 2]);
        assert_eq!(y_ticks(5), [1, 2, 3, 4, 5]);
        assert_eq!(y_ticks(10), [2, 4, 6, 8, 10]);
        assert_eq!(y_ticks(20), [5, 10, 15, 20]);
        assert_eq!(y_ticks(500), [100, 200, 300, 400, 500]);
        assert_eq!(y_ticks(u64::MAX).len(), 5);
    }

    #[test]
    fn numbers_print_with_at_most_one_decimal() {
        assert_eq!(num(12.0), "12");
        assert_eq!(num(12.34), "12.3");
        assert_eq!(num(-0.01), "0");
        assert_eq!(compact(999), "999");
        assert_eq!(compact(1500), "1.5k");
        assert_eq!(compact(2_000_000), "2M");
    }
}
