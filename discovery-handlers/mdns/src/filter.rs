//! Compiled Include/Exclude filters over names: exact, `glob:` and `regex:` items.

use glob::{MatchOptions, Pattern};
use regex::{Regex, RegexBuilder};
use verge_discovery_sdk::{FilterAction, FilterList};

/// Upper bound on a compiled regex, so a hostile or careless pattern cannot
/// take the handler's memory (the regex crate matches in linear time anyway).
pub const REGEX_SIZE_LIMIT: usize = 1 << 20;
/// Items per filter; more is a configuration mistake, not a use case.
pub const MAX_FILTER_ITEMS: usize = 256;

/// One filter item.
#[derive(Clone, Debug)]
pub enum Matcher {
    /// Equal, ignoring ASCII case (DNS names compare case-insensitively).
    Exact(String),
    /// A shell glob (`*`, `?`, `[...]`), ignoring case.
    Glob(Pattern),
    /// A regular expression, searched (anchor it with `^...$` for a full match).
    Regex(Regex),
}

impl Matcher {
    /// Parses `glob:<pattern>`, `regex:<pattern>` or an exact value.
    pub fn parse(item: &str) -> Result<Self, String> {
        if let Some(p) = item.strip_prefix("glob:") {
            Pattern::new(p)
                .map(Matcher::Glob)
                .map_err(|e| format!("glob {p:?}: {e}"))
        } else if let Some(p) = item.strip_prefix("regex:") {
            RegexBuilder::new(p)
                .size_limit(REGEX_SIZE_LIMIT)
                .build()
                .map(Matcher::Regex)
                .map_err(|e| format!("regex {p:?}: {e}"))
        } else {
            Ok(Matcher::Exact(item.to_string()))
        }
    }

    /// Whether `value` matches.
    pub fn matches(&self, value: &str) -> bool {
        match self {
            Matcher::Exact(s) => s.eq_ignore_ascii_case(value),
            Matcher::Glob(p) => p.matches_with(
                value,
                MatchOptions {
                    case_sensitive: false,
                    require_literal_separator: false,
                    require_literal_leading_dot: false,
                },
            ),
            Matcher::Regex(r) => r.is_match(value),
        }
    }
}

/// A `{action, items}` filter with compiled items.
#[derive(Clone, Debug)]
pub struct NameFilter {
    action: FilterAction,
    matchers: Vec<Matcher>,
}

impl NameFilter {
    /// Compiles `list`; `field` names the setting in error messages.
    pub fn compile(field: &str, list: &FilterList) -> Result<Self, String> {
        Self::compile_with(field, list, Matcher::parse)
    }

    /// Compiles with a custom item parser (e.g. `key=value` items).
    pub fn compile_with(
        field: &str,
        list: &FilterList,
        parse: impl Fn(&str) -> Result<Matcher, String>,
    ) -> Result<Self, String> {
        if list.items.len() > MAX_FILTER_ITEMS {
            return Err(format!(
                "{field}: {} items, at most {MAX_FILTER_ITEMS} are allowed",
                list.items.len()
            ));
        }
        let matchers = list
            .items
            .iter()
            .map(|i| parse(i).map_err(|e| format!("{field}: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            action: list.action,
            matchers,
        })
    }

    /// Whether `value` passes.
    pub fn accepts(&self, value: &str) -> bool {
        self.accepts_any(std::iter::once(value))
    }

    /// Include: at least one value is listed. Exclude: no value is listed.
    pub fn accepts_any<'a>(&self, values: impl IntoIterator<Item = &'a str>) -> bool {
        let listed = values
            .into_iter()
            .any(|v| self.matchers.iter().any(|m| m.matches(v)));
        match self.action {
            FilterAction::Include => listed,
            FilterAction::Exclude => !listed,
        }
    }
}

/// Applies an optional filter: `None` keeps everything.
pub fn passes(filter: Option<&NameFilter>, value: &str) -> bool {
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
    fn exact_glob_regex() {
        let f = NameFilter::compile(
            "instanceNames",
            &list(
                FilterAction::Include,
                &["Printer [A1]", "glob:cam-*", "regex:^sensor-[0-9]+$"],
            ),
        )
        .expect("compiles");
        assert!(
            f.accepts("printer [a1]"),
            "exact ignores case, brackets are literal"
        );
        assert!(f.accepts("CAM-front"));
        assert!(f.accepts("sensor-12"));
        assert!(!f.accepts("sensor-x"));
        assert!(!f.accepts("Printer A"));
        let x = NameFilter::compile("x", &list(FilterAction::Exclude, &["glob:cam-*"]))
            .expect("compiles");
        assert!(!x.accepts("cam-1") && x.accepts("door"));
        assert!(passes(None, "anything"));
    }

    #[test]
    fn bad_patterns_are_named() {
        let e = NameFilter::compile("hostNames", &list(FilterAction::Include, &["regex:("]))
            .expect_err("bad regex");
        assert!(e.contains("hostNames") && e.contains("regex"), "{e}");
        let e = NameFilter::compile("hostNames", &list(FilterAction::Include, &["glob:[a"]))
            .expect_err("bad glob");
        assert!(e.contains("glob"), "{e}");
        let huge = "regex:(a{1000}){1000}";
        assert!(NameFilter::compile("x", &list(FilterAction::Include, &[huge])).is_err());
    }
}
