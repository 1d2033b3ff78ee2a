//! Samples of a Prometheus text exposition (`/metrics`), as the tests read them.

use std::collections::BTreeMap;

/// One sample: `name{labels} value`.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Every sample of `text`, in order; comments and unreadable lines are skipped.
pub fn samples(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (name, labels) = series_parts(series)?;
            Some(Sample {
                name,
                labels,
                value: value.trim().parse().ok()?,
            })
        })
        .collect()
}

/// `name{a="x",b="y"}` as its name and labels.
fn series_parts(series: &str) -> Option<(String, BTreeMap<String, String>)> {
    let Some((name, rest)) = series.split_once('{') else {
        return Some((series.trim().to_string(), BTreeMap::new()));
    };
    let mut labels = BTreeMap::new();
    let mut rest = rest.trim_end().strip_suffix('}')?;
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"")?;
        // A value ends at the first quote not escaped by a backslash.
        let mut end = None;
        let mut escaped = false;
        for (i, c) in after.char_indices() {
            match c {
                '\\' if !escaped => escaped = true,
                '"' if !escaped => {
                    end = Some(i);
                    break;
                }
                _ => escaped = false,
            }
        }
        let end = end?;
        labels.insert(
            key.trim_start_matches(',').trim().to_string(),
            after[..end].to_string(),
        );
        rest = after[end + 1..].trim_start_matches(',');
    }
    Some((name.to_string(), labels))
}

/// The value of the sample `series`, written as Prometheus prints it,
/// `metric{label="value",...}`: the same name and exactly these labels, in
/// any order.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    let (name, labels) = series_parts(series)?;
    samples(text)
        .into_iter()
        .find(|s| s.name == name && s.labels == labels)
        .map(|s| s.value)
}

/// The value of the first sample of `name` whose labels include every one of
/// `labels` (others may be there too).
pub fn metric_where(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples(text)
        .into_iter()
        .find(|s| s.name == name && includes(s, labels))
        .map(|s| s.value)
}

/// The sum of the samples of `name` whose labels include every one of
/// `labels` (e.g. `apiserver_request_total` with `verb=LIST`); 0 without any.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    samples(text)
        .into_iter()
        .filter(|s| s.name == name && includes(s, labels))
        .map(|s| s.value)
        .sum()
}

fn includes(sample: &Sample, labels: &[(&str, &str)]) -> bool {
    labels
        .iter()
        .all(|(k, v)| sample.labels.get(*k).is_some_and(|have| have == v))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP x_total things\n# TYPE x_total counter\n\
        x_total{kind=\"a\",node=\"n1\"} 3\n\
        x_total{kind=\"b\",node=\"n1\"} 4\n\
        x_total{kind=\"a\"} 5\n\
        plain 7.5\n\
        quoted{msg=\"say \\\"hi\\\", then go\"} 1\n";

    #[test]
    fn an_exact_series_matches_only_its_own_labels() {
        assert_eq!(metric(TEXT, "x_total{node=\"n1\",kind=\"a\"}"), Some(3.0));
        assert_eq!(metric(TEXT, "x_total{kind=\"a\"}"), Some(5.0));
        assert_eq!(metric(TEXT, "x_total{kind=\"c\"}"), None);
        assert_eq!(metric(TEXT, "x_total"), None);
        assert_eq!(metric(TEXT, "plain"), Some(7.5));
        assert_eq!(
            metric(TEXT, "quoted{msg=\"say \\\"hi\\\", then go\"}"),
            Some(1.0)
        );
    }

    #[test]
    fn some_labels_find_the_first_sample_and_sum_every_one() {
        assert_eq!(metric_where(TEXT, "x_total", &[("kind", "b")]), Some(4.0));
        assert_eq!(metric_where(TEXT, "x_total", &[]), Some(3.0));
        assert_eq!(metric_where(TEXT, "x_total", &[("node", "n2")]), None);
        assert_eq!(metric_sum(TEXT, "x_total", &[("kind", "a")]), 8.0);
        assert_eq!(metric_sum(TEXT, "x_total", &[]), 12.0);
        assert_eq!(metric_sum(TEXT, "absent", &[]), 0.0);
    }
}
