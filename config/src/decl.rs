//! The declaration machinery: what a variable is ([`Var`]), how a section
//! declares its variables once ([`declare!`]), and the [`Reader`] a section
//! parses them with, collecting every problem instead of stopping at the first.

use std::collections::BTreeMap;
use std::fmt;

use crate::Config;

/// When a variable has an effect: `None` when it acts in this configuration,
/// else the hint `tandem check` and the start-up log give for ignoring it.
pub type Scope = fn(&Config) -> Option<&'static str>;

/// One environment variable, declared once in its section.
#[derive(Clone, Copy)]
pub struct Var {
    /// The variable's name.
    pub name: &'static str,
    /// Its default, as an operator would write it.
    pub default: &'static str,
    /// What it means (the README's row and `tandem --help`).
    pub doc: &'static str,
    /// What it accepts, as a bad value's error says it.
    pub accepted: &'static str,
    /// When it acts.
    pub scope: Scope,
}

impl fmt::Debug for Var {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

/// Declares a section's variables: one `pub static` per variable (named as
/// the variable is spelt) and `VARS`, the section's list in declaration order.
#[macro_export]
macro_rules! declare {
    ($( $(#[$meta:meta])* $name:ident { default: $default:expr, doc: $doc:expr, accepted: $accepted:expr, scope: $scope:expr $(,)? } )*) => {
        $(
            $(#[$meta])*
            #[doc = $doc]
            pub static $name: $crate::Var = $crate::Var {
                name: stringify!($name),
                default: $default,
                doc: $doc,
                accepted: $accepted,
                scope: $scope,
            };
        )*
        /// This section's variables, in declaration order.
        pub static VARS: &[&$crate::Var] = &[$(&$name),*];
    };
}

/// One variable with a value tandem cannot use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The variable's name.
    pub var: &'static str,
    /// The value it had.
    pub value: String,
    /// What is accepted instead.
    pub accepted: String,
}

/// Every problem found in the environment, reported together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// The problems, in declaration order.
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration ({} problem", self.problems.len())?;
        if self.problems.len() != 1 {
            write!(f, "s")?;
        }
        write!(f, ")")?;
        for p in &self.problems {
            write!(f, "\n  {}={:?}: expected {}", p.var, p.value, p.accepted)?;
        }
        Ok(())
    }
}

/// The variables as given, read by the sections; collects problems.
pub struct Reader {
    vars: BTreeMap<String, String>,
    problems: Vec<Problem>,
}

impl Reader {
    /// A reader over `vars` (the last value of a name wins).
    pub fn new(vars: impl IntoIterator<Item = (String, String)>) -> Self {
        Reader { vars: vars.into_iter().collect(), problems: Vec::new() }
    }

    /// `var`'s value, trimmed; `None` when unset or blank.
    pub fn value(&self, var: &Var) -> Option<&str> {
        self.ambient(var.name)
    }

    /// A variable tandem does not declare but looks at (`PATH`, `HOME`), trimmed; `None` when unset or blank.
    pub fn ambient(&self, name: &str) -> Option<&str> {
        self.vars.get(name).map(|v| v.trim()).filter(|v| !v.is_empty())
    }

    /// Every variable given (name, value), declared or not.
    pub fn given(&self) -> impl Iterator<Item = (&str, &str)> {
        self.vars.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Records that `var`'s `value` is refused, and what it accepts instead.
    pub fn bad(&mut self, var: &'static Var, value: &str, accepted: impl Into<String>) {
        self.problems.push(Problem { var: var.name, value: value.to_string(), accepted: accepted.into() });
    }

    /// `var` parsed with `parse`, or `default` when unset, blank or refused
    /// (then a problem says what [`Var::accepted`] allows).
    pub fn get<T>(&mut self, var: &'static Var, default: T, parse: impl FnOnce(&str) -> Option<T>) -> T {
        self.get_accepting(var, var.accepted, default, parse)
    }

    /// As [`Reader::get`], with the accepted values worked out from other settings.
    pub fn get_accepting<T>(
        &mut self,
        var: &'static Var,
        accepted: &str,
        default: T,
        parse: impl FnOnce(&str) -> Option<T>,
    ) -> T {
        let Some(v) = self.value(var).map(str::to_string) else { return default };
        match parse(&v) {
            Some(t) => t,
            None => {
                self.bad(var, &v, accepted);
                default
            }
        }
    }

    /// The problems found, sorted into declaration order; `Err` when there are any.
    pub fn finish(mut self) -> Result<(), ConfigError> {
        if self.problems.is_empty() {
            return Ok(());
        }
        let position = |name: &str| crate::vars().position(|v| v.name == name).unwrap_or(usize::MAX);
        self.problems.sort_by_key(|p| position(p.var));
        Err(ConfigError { problems: self.problems })
    }
}
