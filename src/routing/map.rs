//! Which tokens each routed layer kept, as a table a person can read: the routing map.
//!
//! It is how a user sees whether a router learned something sensible (punctuation and
//! function words skipped, content words kept) or something broken (a token class always
//! skipped, the first token dropped). [`RoutingMap::to_text`] gives one line per token;
//! [`RoutingMap::to_html`] a heat map of routed layers × tokens with the tokens along the
//! axis and the number of routed layers each token used.

use super::RoutingStats;
use crate::error::{Error, Result};

/// The kept / skipped decision of every routed layer for every token of one sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingMap {
    /// The routed layers' indices, in model order.
    pub layers: Vec<usize>,
    /// The tokens as text, one entry per position.
    pub tokens: Vec<String>,
    /// `kept[i][t]`: whether routed layer `layers[i]` computed token `t`.
    pub kept: Vec<Vec<bool>>,
}

impl RoutingMap {
    /// The map of row `row` of a forward pass's routing statistics (one per routed layer,
    /// as [`crate::ModOutput::stats`] holds them), with `tokens` naming the row's first
    /// `tokens.len()` positions (the rest, e.g. padding, is left out).
    ///
    /// Errors: [`Error::InvalidArgument`] when `row` is outside the batch or `tokens` is
    /// longer than the row; [`Error::Candle`] when a mask cannot be read.
    pub fn from_stats(stats: &[RoutingStats], row: usize, tokens: Vec<String>) -> Result<Self> {
        let mut layers = Vec::with_capacity(stats.len());
        let mut kept = Vec::with_capacity(stats.len());
        for s in stats {
            let (rows, len) = s.kept_mask.dims2()?;
            if row >= rows || tokens.len() > len {
                return Err(Error::InvalidArgument(format!(
                    "routing map of row {row} with {} tokens: layer {} routed {rows} rows \
                     of {len} tokens",
                    tokens.len(),
                    s.layer
                )));
            }
            let mask: Vec<f32> = s
                .kept_mask
                .get(row)?
                .to_dtype(candle_core::DType::F32)?
                .to_vec1()?;
            kept.push(mask[..tokens.len()].iter().map(|&m| m > 0.5).collect());
            layers.push(s.layer);
        }
        Ok(Self {
            layers,
            tokens,
            kept,
        })
    }

    /// How many routed layers computed each token.
    pub fn layers_used(&self) -> Vec<usize> {
        (0..self.tokens.len())
            .map(|t| self.kept.iter().filter(|layer| layer[t]).count())
            .collect()
    }

    /// One line per token: the routed layers as `#` (kept) or `.` (skipped), in model
    /// order, the number used, and the token (whitespace shown as `␣`, `⏎`, `⇥`).
    pub fn to_text(&self) -> String {
        let used = self.layers_used();
        let mut out = format!(
            "routed layers {} (# kept, . skipped) | used | token\n",
            self.layers
                .iter()
                .map(|l| l.to_string())
                .collect::<Vec<_>>()
                .join(",")
        );
        for (t, token) in self.tokens.iter().enumerate() {
            let cells: String = self
                .kept
                .iter()
                .map(|layer| if layer[t] { '#' } else { '.' })
                .collect();
            out.push_str(&format!(
                "{cells} | {:>2}/{} | {}\n",
                used[t],
                self.layers.len(),
                visible(token)
            ));
        }
        out
    }

    /// A self-contained HTML page: routed layers as rows, tokens as columns (their text
    /// along the top, the number of routed layers they used along the bottom), kept cells
    /// filled.
    pub fn to_html(&self) -> String {
        let used = self.layers_used();
        let mut html = String::from(
            "<!doctype html>\n<meta charset=\"utf-8\">\n<title>Routing map</title>\n<style>\n\
             table{border-collapse:collapse;font:12px monospace}\n\
             td,th{border:1px solid #ddd;padding:1px 3px;text-align:center}\n\
             th.tok{writing-mode:vertical-rl;white-space:pre;font-weight:normal}\n\
             td.kept{background:#1f6fb4}\n td.skipped{background:#fff}\n</style>\n\
             <p>Routed layers (rows) × tokens (columns): filled = the layer computed the \
             token; bottom row = routed layers used.</p>\n<table>\n<tr><th>layer</th>",
        );
        for token in &self.tokens {
            html.push_str(&format!(
                "<th class=\"tok\">{}</th>",
                escape(&visible(token))
            ));
        }
        html.push_str("</tr>\n");
        for (layer, kept) in self.layers.iter().zip(&self.kept) {
            html.push_str(&format!("<tr><th>{layer}</th>"));
            for &k in kept {
                let class = if k { "kept" } else { "skipped" };
                html.push_str(&format!("<td class=\"{class}\"></td>"));
            }
            html.push_str("</tr>\n");
        }
        html.push_str("<tr><th>used</th>");
        for u in used {
            html.push_str(&format!("<td>{u}</td>"));
        }
        html.push_str("</tr>\n</table>\n");
        html
    }
}

/// A token with its whitespace made visible.
fn visible(token: &str) -> String {
    token
        .replace(' ', "␣")
        .replace('\n', "⏎")
        .replace('\t', "⇥")
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
