//! Akri's udev rule subset: comma-separated matches `KEY=="regex"` / `KEY!="regex"`.
//!
//! Hand-written rather than generated (Akri uses a pest grammar): the grammar is a
//! dozen tokens, and a small scanner gives error messages that name the offending
//! key or operator, which is what users need to fix a Configuration.

use regex::{Regex, RegexBuilder};

/// Longest rule accepted, in bytes. Real rules are a few hundred bytes.
pub const MAX_RULE_LEN: usize = 8 * 1024;
/// Most matches in one rule.
pub const MAX_MATCHES_PER_RULE: usize = 64;
/// Compiled size limit per regex, so a hostile pattern cannot take the agent's memory.
pub const REGEX_SIZE_LIMIT: usize = 256 * 1024;
/// Nesting limit per regex.
pub const REGEX_NEST_LIMIT: u32 = 32;

/// What a match compares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Key {
    /// `ATTRS{name}`: an attribute of the device or one of its ancestors.
    Attrs(String),
    /// `ATTR{name}`: an attribute of the device.
    Attr(String),
    /// `DEVPATH`.
    Devpath,
    /// `DRIVERS`: the driver of the device or one of its ancestors.
    Drivers,
    /// `DRIVER`.
    Driver,
    /// `KERNELS`: the kernel name of the device or one of its ancestors.
    Kernels,
    /// `KERNEL`: the kernel name (sysname).
    Kernel,
    /// `ENV{name}`: a udev property of the device.
    Env(String),
    /// `SUBSYSTEMS`.
    Subsystems,
    /// `SUBSYSTEM`.
    Subsystem,
    /// `TAGS`.
    Tags,
    /// `TAG`.
    Tag,
}

impl Key {
    /// Whether the key also looks at the device's ancestors.
    pub fn walks_parents(&self) -> bool {
        matches!(
            self,
            Key::Attrs(_) | Key::Drivers | Key::Kernels | Key::Subsystems | Key::Tags
        )
    }
}

/// `==` or `!=`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// The value matches the regex.
    Equal,
    /// The value does not match the regex.
    NotEqual,
}

/// One `KEY op "value"`.
#[derive(Clone, Debug)]
pub struct Match {
    /// What is compared.
    pub key: Key,
    /// How.
    pub op: Op,
    /// The value as written.
    pub value: String,
    /// The value compiled, anchored at both ends.
    pub regex: Regex,
}

/// One rule: all of its matches must hold.
#[derive(Clone, Debug)]
pub struct Rule {
    /// The rule as written.
    pub text: String,
    /// Its matches.
    pub matches: Vec<Match>,
}

/// Why a rule was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    /// The rule has no match at all.
    #[error("the rule is empty")]
    Empty,
    /// The rule is longer than [`MAX_RULE_LEN`].
    #[error("the rule is longer than {MAX_RULE_LEN} bytes")]
    TooLong,
    /// More than [`MAX_MATCHES_PER_RULE`] matches.
    #[error("the rule has more than {MAX_MATCHES_PER_RULE} matches")]
    TooManyMatches,
    /// A key outside the supported set.
    #[error(
        "unsupported key {0:?}: only ATTRS{{}}, ATTR{{}}, DEVPATH, DRIVERS, DRIVER, KERNELS, KERNEL, ENV{{}}, SUBSYSTEMS, SUBSYSTEM, TAGS and TAG can be matched"
    )]
    UnsupportedKey(String),
    /// An assignment (`=`, `+=`, `-=`, `:=`) instead of a comparison.
    #[error(
        "unsupported operator {op:?} after {key}: only == and != are allowed (rules select devices, they cannot assign)"
    )]
    UnsupportedOperator {
        /// The key it follows.
        key: String,
        /// The operator.
        op: String,
    },
    /// `ATTR`, `ATTRS` and `ENV` need `{name}`; other keys take none.
    #[error("{0}")]
    BadAttribute(String),
    /// Anything else that does not parse.
    #[error("syntax error at byte {at}: {message}")]
    Syntax {
        /// Byte offset.
        at: usize,
        /// What was expected.
        message: String,
    },
    /// The value is not a valid regex (or too large).
    #[error("value {value:?} of {key} is not a valid regular expression: {message}")]
    BadRegex {
        /// The key.
        key: String,
        /// The value.
        value: String,
        /// The regex engine's reason.
        message: String,
    },
}

struct Scanner<'a> {
    text: &'a str,
    pos: usize,
}

impl<'a> Scanner<'a> {
    fn rest(&self) -> &'a str {
        self.text.get(self.pos..).unwrap_or("")
    }

    fn peek(&self) -> Option<char> {
        self.rest().chars().next()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += c.len_utf8();
        Some(c)
    }

    fn skip_separators(&mut self) {
        while matches!(self.peek(), Some(c) if c == ',' || c.is_whitespace()) {
            self.bump();
        }
    }

    fn skip_spaces(&mut self) {
        while matches!(self.peek(), Some(c) if c.is_whitespace()) {
            self.bump();
        }
    }

    fn syntax(&self, message: impl Into<String>) -> RuleError {
        RuleError::Syntax {
            at: self.pos,
            message: message.into(),
        }
    }

    fn word(&mut self) -> &'a str {
        let start = self.pos;
        while matches!(self.peek(), Some(c) if c.is_ascii_alphanumeric() || c == '_') {
            self.bump();
        }
        self.text.get(start..self.pos).unwrap_or("")
    }

    /// `{name}` after ATTR/ATTRS/ENV, if present.
    fn attribute(&mut self) -> Result<Option<String>, RuleError> {
        if self.peek() != Some('{') {
            return Ok(None);
        }
        self.bump();
        let start = self.pos;
        loop {
            match self.bump() {
                Some('}') => break,
                Some(c) if c == '"' || c == '{' || c.is_control() => {
                    return Err(self.syntax(format!("unexpected {c:?} in a {{name}}")));
                }
                Some(_) => {}
                None => return Err(self.syntax("unterminated {name}")),
            }
        }
        let name = self.text.get(start..self.pos - 1).unwrap_or("").trim();
        if name.is_empty() {
            return Err(self.syntax("empty {name}"));
        }
        Ok(Some(name.to_string()))
    }

    fn operator(&mut self) -> &'a str {
        let start = self.pos;
        while matches!(self.peek(), Some('=' | '!' | '+' | '-' | ':')) {
            self.bump();
        }
        self.text.get(start..self.pos).unwrap_or("")
    }

    /// A double-quoted value; `\"` stands for a quote, every other backslash is
    /// kept for the regex.
    fn value(&mut self) -> Result<String, RuleError> {
        if self.bump() != Some('"') {
            return Err(self.syntax("expected a double-quoted value"));
        }
        let mut out = String::new();
        loop {
            match self.bump() {
                Some('"') => return Ok(out),
                Some('\\') => match self.bump() {
                    Some('"') => out.push('"'),
                    Some(c) => {
                        out.push('\\');
                        out.push(c);
                    }
                    None => return Err(self.syntax("unterminated value")),
                },
                Some(c) => out.push(c),
                None => return Err(self.syntax("unterminated value")),
            }
        }
    }
}

fn key_from(name: &str, attribute: Option<String>) -> Result<Key, RuleError> {
    let needs = |key: fn(String) -> Key| match &attribute {
        Some(a) => Ok(key(a.clone())),
        None => Err(RuleError::BadAttribute(format!(
            "{name} needs an attribute name, e.g. {name}{{idVendor}}"
        ))),
    };
    let plain = |key: Key| match &attribute {
        None => Ok(key),
        Some(a) => Err(RuleError::BadAttribute(format!(
            "{name} takes no {{name}}, found {name}{{{a}}}"
        ))),
    };
    match name {
        "ATTRS" => needs(Key::Attrs),
        "ATTR" => needs(Key::Attr),
        "ENV" => needs(Key::Env),
        "DEVPATH" => plain(Key::Devpath),
        "DRIVERS" => plain(Key::Drivers),
        "DRIVER" => plain(Key::Driver),
        "KERNELS" => plain(Key::Kernels),
        "KERNEL" => plain(Key::Kernel),
        "SUBSYSTEMS" => plain(Key::Subsystems),
        "SUBSYSTEM" => plain(Key::Subsystem),
        "TAGS" => plain(Key::Tags),
        "TAG" => plain(Key::Tag),
        other => Err(RuleError::UnsupportedKey(match attribute {
            Some(a) => format!("{other}{{{a}}}"),
            None => other.to_string(),
        })),
    }
}

fn compile(key: &str, value: &str) -> Result<Regex, RuleError> {
    RegexBuilder::new(&format!("^(?:{value})$"))
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(REGEX_SIZE_LIMIT)
        .nest_limit(REGEX_NEST_LIMIT)
        .build()
        .map_err(|e| RuleError::BadRegex {
            key: key.to_string(),
            value: value.to_string(),
            message: e.to_string(),
        })
}

/// Parses one rule.
pub fn parse_rule(text: &str) -> Result<Rule, RuleError> {
    if text.len() > MAX_RULE_LEN {
        return Err(RuleError::TooLong);
    }
    let mut s = Scanner { text, pos: 0 };
    let mut matches = Vec::new();
    loop {
        s.skip_separators();
        if s.peek().is_none() {
            break;
        }
        if matches.len() == MAX_MATCHES_PER_RULE {
            return Err(RuleError::TooManyMatches);
        }
        let name = s.word();
        if name.is_empty() {
            let found = s.peek().map(|c| format!("{c:?}")).unwrap_or_default();
            return Err(s.syntax(format!("expected a key such as KERNEL, found {found}")));
        }
        let attribute = s.attribute()?;
        let shown = match &attribute {
            Some(a) => format!("{name}{{{a}}}"),
            None => name.to_string(),
        };
        // The key is checked first so that `NAME="x"` names the key, the real mistake.
        let key = key_from(name, attribute)?;
        s.skip_spaces();
        let op = match s.operator() {
            "==" => Op::Equal,
            "!=" => Op::NotEqual,
            "" => return Err(s.syntax(format!("expected == or != after {shown}"))),
            other => {
                return Err(RuleError::UnsupportedOperator {
                    key: shown,
                    op: other.to_string(),
                });
            }
        };
        s.skip_spaces();
        let value = s.value()?;
        let regex = compile(&shown, &value)?;
        matches.push(Match {
            key,
            op,
            value,
            regex,
        });
        s.skip_spaces();
        match s.peek() {
            None | Some(',') => {}
            Some(c) => return Err(s.syntax(format!("expected ',' between matches, found {c:?}"))),
        }
    }
    if matches.is_empty() {
        return Err(RuleError::Empty);
    }
    Ok(Rule {
        text: text.to_string(),
        matches,
    })
}

/// What matching needs from a device; implemented for `udev::Device` and for
/// test doubles.
pub trait DeviceView: Sized {
    /// Kernel name, e.g. `video0`.
    fn sysname(&self) -> Option<String>;
    /// Path below /sys, e.g. `/devices/pci0000:00/.../video4linux/video0`.
    fn devpath(&self) -> Option<String>;
    /// Subsystem, e.g. `video4linux`.
    fn subsystem(&self) -> Option<String>;
    /// Bound driver.
    fn driver(&self) -> Option<String>;
    /// A sysfs attribute.
    fn attribute(&self, name: &str) -> Option<String>;
    /// A udev property.
    fn property(&self, name: &str) -> Option<String>;
    /// The device's udev tags.
    fn tags(&self) -> Vec<String>;
    /// The parent device.
    fn parent(&self) -> Option<Self>;
}

/// Most ancestors walked for the plural keys; sysfs trees are a dozen deep at most,
/// the bound protects against a cycle in a broken view.
pub const MAX_PARENT_DEPTH: usize = 64;

fn holds_on<D: DeviceView>(m: &Match, d: &D) -> bool {
    let is = |v: Option<String>| v.is_some_and(|v| m.regex.is_match(&v));
    match &m.key {
        Key::Attrs(a) | Key::Attr(a) => is(d.attribute(a)),
        Key::Devpath => is(d.devpath()),
        Key::Drivers | Key::Driver => is(d.driver()),
        Key::Kernels | Key::Kernel => is(d.sysname()),
        Key::Env(p) => is(d.property(p)),
        Key::Subsystems | Key::Subsystem => is(d.subsystem()),
        Key::Tags | Key::Tag => d.tags().iter().any(|t| m.regex.is_match(t)),
    }
}

impl Match {
    /// Whether the match holds for `device`. Plural keys hold when the device or
    /// any ancestor has a matching value (each key on its own, as Akri does); their
    /// `!=` form holds when none has. A missing value never equals anything.
    pub fn holds<D: DeviceView>(&self, device: &D) -> bool {
        let found = if self.key.walks_parents() {
            let mut current = Some(holds_on(self, device));
            let mut parent = device.parent();
            let mut depth = 0;
            while current == Some(false) {
                match parent {
                    Some(p) if depth < MAX_PARENT_DEPTH => {
                        current = Some(holds_on(self, &p));
                        parent = p.parent();
                        depth += 1;
                    }
                    _ => break,
                }
            }
            current == Some(true)
        } else {
            holds_on(self, device)
        };
        match self.op {
            Op::Equal => found,
            Op::NotEqual => !found,
        }
    }
}

impl Rule {
    /// Whether every match holds.
    pub fn matches<D: DeviceView>(&self, device: &D) -> bool {
        self.matches.iter().all(|m| m.holds(device))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Fake {
        sysname: &'static str,
        subsystem: &'static str,
        driver: Option<&'static str>,
        attrs: Vec<(&'static str, &'static str)>,
        tags: Vec<&'static str>,
        parent: Option<Box<Fake>>,
    }

    impl DeviceView for Fake {
        fn sysname(&self) -> Option<String> {
            Some(self.sysname.into())
        }
        fn devpath(&self) -> Option<String> {
            Some(format!("/devices/{}", self.sysname))
        }
        fn subsystem(&self) -> Option<String> {
            Some(self.subsystem.into())
        }
        fn driver(&self) -> Option<String> {
            self.driver.map(Into::into)
        }
        fn attribute(&self, name: &str) -> Option<String> {
            self.attrs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
        fn property(&self, name: &str) -> Option<String> {
            (name == "ID_BUS").then(|| "usb".into())
        }
        fn tags(&self) -> Vec<String> {
            self.tags.iter().map(|t| t.to_string()).collect()
        }
        fn parent(&self) -> Option<Self> {
            self.parent.as_deref().cloned()
        }
    }

    fn tty() -> Fake {
        let usb = Fake {
            sysname: "1-1",
            subsystem: "usb",
            driver: Some("usb"),
            attrs: vec![("idVendor", "0403"), ("idProduct", "6001")],
            ..Default::default()
        };
        Fake {
            sysname: "ttyUSB0",
            subsystem: "tty",
            tags: vec!["systemd"],
            parent: Some(Box::new(usb)),
            ..Default::default()
        }
    }

    #[test]
    fn akri_rules_parse_and_match() {
        let r = parse_rule(r#"SUBSYSTEM=="tty", ATTRS{idVendor}=="0403""#).expect("parse");
        assert!(r.matches(&tty()));
        let r = parse_rule(r#"KERNEL=="video[0-9]*""#).expect("parse");
        assert!(!r.matches(&tty()));
        let r = parse_rule(r#"KERNEL=="ttyUSB[0-9]*""#).expect("parse");
        assert!(r.matches(&tty()));
        // Whole-value match: a prefix is not enough.
        let r = parse_rule(r#"KERNEL=="ttyUSB""#).expect("parse");
        assert!(!r.matches(&tty()));
        // Singular ATTR does not look at parents.
        let r = parse_rule(r#"ATTR{idVendor}=="0403""#).expect("parse");
        assert!(!r.matches(&tty()));
        let r = parse_rule(r#"ATTRS{idVendor}!="0403""#).expect("parse");
        assert!(!r.matches(&tty()));
        let r = parse_rule(r#"DRIVERS=="usb",KERNELS=="1-1" , TAG=="systemd""#).expect("parse");
        assert!(r.matches(&tty()));
        let r = parse_rule(r#"ENV{ID_BUS}=="usb", DRIVER!="x", TAGS=="sys.*""#).expect("parse");
        assert!(r.matches(&tty()));
        let r = parse_rule(r#"SUBSYSTEMS=="usb", SUBSYSTEM!="usb""#).expect("parse");
        assert!(r.matches(&tty()));
        let r = parse_rule(r#"ATTRS{missing}=="""#).expect("parse");
        assert!(!r.matches(&tty()));
        let r = parse_rule(r#"ATTRS{idProduct}=="6\"001""#).expect("escaped quote");
        assert_eq!(r.matches[0].value, "6\"001");
    }

    #[test]
    fn refusals_name_the_problem() {
        let e = parse_rule(r#"NAME=="x""#).expect_err("key");
        assert_eq!(e, RuleError::UnsupportedKey("NAME".into()));
        assert!(e.to_string().contains("NAME"), "{e}");
        let e = parse_rule(r#"KERNEL=="x", SYMLINK+="y""#).expect_err("key");
        assert!(e.to_string().contains("SYMLINK"), "{e}");
        for op in ["=", "+=", "-=", ":="] {
            let e = parse_rule(&format!(r#"KERNEL{op}"x""#)).expect_err("op");
            assert!(e.to_string().contains(&format!("{op:?}")), "{e}");
        }
        assert_eq!(parse_rule(" , ").expect_err("empty"), RuleError::Empty);
        assert!(matches!(
            parse_rule(r#"KERNEL=="(""#),
            Err(RuleError::BadRegex { .. })
        ));
        assert!(matches!(
            parse_rule(r#"ATTRS=="x""#),
            Err(RuleError::BadAttribute(_))
        ));
        assert!(matches!(
            parse_rule(r#"KERNEL{x}=="x""#),
            Err(RuleError::BadAttribute(_))
        ));
        assert!(matches!(
            parse_rule(r#"KERNEL=="x"#),
            Err(RuleError::Syntax { .. })
        ));
        assert!(matches!(
            parse_rule(r#"KERNEL=="x" KERNEL=="y""#),
            Err(RuleError::Syntax { .. })
        ));
        assert!(matches!(
            parse_rule(r#"KERNEL==x"#),
            Err(RuleError::Syntax { .. })
        ));
        assert!(matches!(
            parse_rule(&"K".repeat(MAX_RULE_LEN + 1)),
            Err(RuleError::TooLong)
        ));
        assert!(matches!(
            parse_rule(r#"KERNEL=="a{1000}{1000}{1000}""#),
            Err(RuleError::BadRegex { .. })
        ));
    }
}
