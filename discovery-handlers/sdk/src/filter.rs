//! The contract's `{action: Include|Exclude, items: [...]}` filter lists.

use serde::Deserialize;

/// Whether listed items are kept or dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum FilterAction {
    /// Keep only the listed items.
    Include,
    /// Drop the listed items.
    Exclude,
}

/// A filter over strings. An absent filter (`Option::None`) keeps everything.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterList {
    /// Include or Exclude.
    pub action: FilterAction,
    /// The items, compared with [`FilterList::accepts_with`]'s comparison.
    #[serde(default)]
    pub items: Vec<String>,
}

impl FilterList {
    /// Whether `value` passes, comparing items exactly.
    pub fn accepts(&self, value: &str) -> bool {
        self.accepts_with(value, |item, v| item == v)
    }

    /// Whether `value` passes, with a custom comparison (e.g. case-insensitive MACs).
    pub fn accepts_with(&self, value: &str, eq: impl Fn(&str, &str) -> bool) -> bool {
        let listed = self.items.iter().any(|item| eq(item, value));
        match self.action {
            FilterAction::Include => listed,
            FilterAction::Exclude => !listed,
        }
    }

    /// Whether any of `values` passes: with Include, one listed value is
    /// enough; with Exclude, a device is dropped if any of its values is listed.
    pub fn accepts_any<'a>(&self, values: impl IntoIterator<Item = &'a str>) -> bool {
        let mut any_listed = false;
        for v in values {
            if self.items.iter().any(|item| item == v) {
                any_listed = true;
                break;
            }
        }
        match self.action {
            FilterAction::Include => any_listed,
            FilterAction::Exclude => !any_listed,
        }
    }
}

/// Applies an optional filter: `None` keeps everything.
pub fn passes(filter: Option<&FilterList>, value: &str) -> bool {
    filter.is_none_or(|f| f.accepts(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(action: FilterAction, items: &[&str]) -> FilterList {
        FilterList {
            action,
            items: items.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn include_exclude_and_absent() {
        let inc = list(FilterAction::Include, &["a"]);
        let exc = list(FilterAction::Exclude, &["a"]);
        assert!(inc.accepts("a") && !inc.accepts("b"));
        assert!(!exc.accepts("a") && exc.accepts("b"));
        assert!(passes(None, "anything"));
        assert!(!list(FilterAction::Include, &[]).accepts("a"));
        assert!(list(FilterAction::Exclude, &[]).accepts("a"));
        assert!(inc.accepts_any(["x", "a"]));
        assert!(!exc.accepts_any(["x", "a"]));
        assert!(inc.accepts_with("A", |i, v| i.eq_ignore_ascii_case(v)));
    }

    #[test]
    fn parses_the_akri_shape() {
        let f: FilterList =
            serde_saphyr::from_str("action: Exclude\nitems:\n- 10.0.0.1\n").expect("parse");
        assert_eq!(f, list(FilterAction::Exclude, &["10.0.0.1"]));
        assert!(serde_saphyr::from_str::<FilterList>("action: Maybe\nitems: []").is_err());
    }
}
