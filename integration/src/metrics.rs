//! A scraper for the daemon's Prometheus/OpenMetrics text exposition.

use std::collections::HashMap;
use std::ops::Deref;

use anyhow::{ensure, Result};

/// One scrape: full series string (e.g. `damselfly_download_bytes_total{source="origin"}`, as
/// printed) → value.
#[derive(Debug, Clone, Default)]
pub struct Metrics(pub HashMap<String, f64>);

impl Deref for Metrics {
    type Target = HashMap<String, f64>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Metrics {
    /// `GET url` and parse.
    pub async fn scrape(url: &str) -> Result<Metrics> {
        let resp = crate::util::http_client().get(url).send().await?;
        ensure!(resp.status().is_success(), "GET {url}: {}", resp.status());
        Ok(Metrics::parse(&resp.text().await?))
    }

    pub fn parse(text: &str) -> Metrics {
        let mut map = HashMap::new();
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            // The series ends at the closing brace of the label set (label values may contain
            // spaces), or at the first whitespace when there are no labels.
            let series_end = match (line.find('{'), line.rfind('}')) {
                (Some(open), Some(close)) if close > open && !line[..open].contains(char::is_whitespace) => close + 1,
                _ => line.find(char::is_whitespace).unwrap_or(line.len()),
            };
            let (series, rest) = line.split_at(series_end);
            if let Some(value) = rest.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()) {
                map.insert(series.to_owned(), value);
            }
        }
        Metrics(map)
    }

    /// Value of one exact series, 0 when absent (an unregistered counter has not counted yet).
    pub fn value(&self, series: &str) -> f64 {
        self.0.get(series).copied().unwrap_or(0.0)
    }

    /// Sum over the series of metric `name` whose labels include every `(label, value)` of
    /// `filter`. `sum("damselfly_download_bytes_total", &[("source", "cache")])`.
    pub fn sum(&self, name: &str, filter: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .filter(|(series, _)| {
                let (n, labels) = split_series(series);
                n == name && filter.iter().all(|(k, v)| labels.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|(_, v)| v)
            .sum()
    }

    /// Whether any series of metric `name` is exposed (so that a `sum` of 0 means "counted
    /// nothing", not "metric missing").
    pub fn has(&self, name: &str) -> bool {
        self.0.keys().any(|series| split_series(series).0 == name)
    }

    /// Series whose metric name starts with `prefix`, for failure messages.
    pub fn with_prefix(&self, prefix: &str) -> Vec<(String, f64)> {
        let mut v: Vec<_> =
            self.0.iter().filter(|(k, _)| k.starts_with(prefix)).map(|(k, v)| (k.clone(), *v)).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

/// `name{a="x",b="y"}` → (`name`, [(a, x), (b, y)]); handles `\"`, `\\` and `\n` escapes.
fn split_series(series: &str) -> (&str, Vec<(String, String)>) {
    let Some(open) = series.find('{') else {
        return (series, Vec::new());
    };
    let name = &series[..open];
    let body = series[open + 1..].strip_suffix('}').unwrap_or(&series[open + 1..]);
    let mut labels = Vec::new();
    let mut chars = body.chars().peekable();
    loop {
        while matches!(chars.peek(), Some(',') | Some(' ')) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
        if key.is_empty() {
            break;
        }
        if chars.next() != Some('"') {
            break;
        }
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(other) => value.push(other),
                    None => break,
                },
                '"' => break,
                c => value.push(c),
            }
        }
        labels.push((key.trim().to_owned(), value));
    }
    (name, labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_openmetrics_text() {
        let m = Metrics::parse(
            "# HELP damselfly_download_bytes Bytes served.\n\
             # TYPE damselfly_download_bytes counter\n\
             damselfly_download_bytes_total{source=\"origin\"} 100\n\
             damselfly_download_bytes_total{source=\"cache\",registry=\"a b\\\"c\"} 25 1700000000\n\
             damselfly_download_bytes_total{source=\"cache\",registry=\"other\"} 5\n\
             damselfly_cache_bytes 4.5e3\n\
             # EOF\n",
        );
        assert_eq!(m.value("damselfly_download_bytes_total{source=\"origin\"}"), 100.0);
        assert_eq!(m.sum("damselfly_download_bytes_total", &[("source", "cache")]), 30.0);
        assert_eq!(m.sum("damselfly_download_bytes_total", &[("registry", "a b\"c")]), 25.0);
        assert_eq!(m.sum("damselfly_download_bytes_total", &[]), 130.0);
        assert_eq!(m.sum("damselfly_cache_bytes", &[]), 4500.0);
        assert_eq!(m.value("absent"), 0.0);
        assert!(m.has("damselfly_cache_bytes") && !m.has("damselfly_cache"));
    }
}
