//! Parsing discoveryDetails.

use serde::de::DeserializeOwned;

use crate::DiscoveryError;

/// Parses discoveryDetails (YAML, or JSON, which is YAML too) into a settings
/// type. Empty text means "all defaults". Give the settings type
/// `#[serde(deny_unknown_fields)]` so a misspelt field is refused with a message
/// naming it.
pub fn parse_details<T: DeserializeOwned + Default>(details: &str) -> Result<T, DiscoveryError> {
    if details.trim().is_empty() {
        return Ok(T::default());
    }
    serde_saphyr::from_str(details).map_err(|e| DiscoveryError::InvalidSettings(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Default, Debug, PartialEq)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    struct Settings {
        #[serde(default)]
        descriptions: Vec<String>,
        #[serde(default)]
        timeout_seconds: Option<u32>,
    }

    #[test]
    fn yaml_json_and_empty() {
        let y: Settings = parse_details("descriptions:\n- a\n- b\n").expect("yaml");
        assert_eq!(y.descriptions, ["a", "b"]);
        let j: Settings =
            parse_details(r#"{"descriptions": ["a"], "timeoutSeconds": 3}"#).expect("json");
        assert_eq!(j.timeout_seconds, Some(3));
        assert_eq!(
            parse_details::<Settings>("  \n").expect("empty"),
            Settings::default()
        );
    }

    #[test]
    fn unknown_and_mistyped_fields_are_named() {
        let e = parse_details::<Settings>("descriptionz: [a]").expect_err("unknown");
        assert!(
            matches!(&e, DiscoveryError::InvalidSettings(m) if m.contains("descriptionz")),
            "{e}"
        );
        let e = parse_details::<Settings>("timeoutSeconds: soon").expect_err("mistyped");
        assert!(matches!(e, DiscoveryError::InvalidSettings(_)));
        let e = parse_details::<Settings>("descriptions: [a").expect_err("malformed");
        assert!(matches!(e, DiscoveryError::InvalidSettings(_)));
    }
}
