//! Which proxied registry requests go through the cache: a list of regular expressions matched
//! anywhere in the request's URL, as Dragonfly's proxy rules are (`blobs/sha256.*` by default:
//! blobs, which are content-addressed and large; manifests by tag would be cached by a name
//! that moves).

use regex::{Regex, RegexSet};

/// The rule used when none is configured.
pub const DEFAULT_RULE: &str = "blobs/sha256.*";

/// Longest rule accepted, and most rules: a configuration, not a program.
const MAX_RULE_LEN: usize = 1024;
const MAX_RULES: usize = 256;

#[derive(Debug)]
pub struct Rules(RegexSet);

impl Rules {
    /// Compiles `rules`; none configured means [`DEFAULT_RULE`].
    pub fn new(rules: &[String]) -> Result<Rules, String> {
        if rules.len() > MAX_RULES {
            return Err(format!("at most {MAX_RULES} proxy rules"));
        }
        let rules: Vec<&str> = match rules.is_empty() {
            true => vec![DEFAULT_RULE],
            false => rules.iter().map(String::as_str).collect(),
        };
        for rule in &rules {
            if rule.len() > MAX_RULE_LEN {
                return Err(format!("proxy rule longer than {MAX_RULE_LEN} bytes"));
            }
            Regex::new(rule).map_err(|e| format!("proxy rule {rule:?}: {e}"))?;
        }
        RegexSet::new(&rules).map(Rules).map_err(|e| format!("proxy rules: {e}"))
    }

    pub fn matches(&self, url: &str) -> bool {
        self.0.is_match(url)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_rule_takes_blobs_and_leaves_the_rest() {
        let rules = Rules::new(&[]).expect("default");
        assert!(rules.matches("http://r:5000/v2/team/app/blobs/sha256:abcd"));
        assert!(!rules.matches("http://r:5000/v2/team/app/manifests/v1"));
        assert!(!rules.matches("http://r:5000/v2/"));
    }

    #[test]
    fn configured_rules_replace_the_default_and_bad_ones_are_refused() {
        let rules = Rules::new(&["manifests/sha256:.*".to_owned()]).expect("rule");
        assert!(rules.matches("http://r/v2/a/manifests/sha256:00"));
        assert!(!rules.matches("http://r/v2/a/blobs/sha256:00"));
        assert!(Rules::new(&["(".to_owned()]).is_err());
        assert!(Rules::new(&["a".repeat(MAX_RULE_LEN + 1)]).is_err());
    }
}
