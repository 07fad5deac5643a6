//! Errors of one reconcile. Refusals of the API server that retrying cannot fix (an invalid
//! broker spec) are not errors: they become conditions and Events instead.

/// Why a reconcile failed; the controller retries it with a capped backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the Kubernetes API failed.
    #[error("Kubernetes API call failed: {0}")]
    Kube(#[from] kube::Error),

    /// The object lacks a field the API server always sets.
    #[error("{kind} has no {field}")]
    MissingField {
        /// Object kind.
        kind: &'static str,
        /// Missing field.
        field: &'static str,
    },

    /// Brokers could not be created or deleted; the details are in Events and conditions.
    #[error("{count} broker operation(s) failed; first: {first}")]
    Brokers {
        /// How many failed.
        count: usize,
        /// The first failure.
        first: String,
    },
}

impl Error {
    /// Short, bounded label for the error metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::MissingField { .. } => "missing_field",
            Error::Brokers { .. } => "brokers",
        }
    }
}

/// Whether an API error is the server refusing the request itself (4xx other than conflicts
/// and throttling), so that retrying the same request cannot help.
pub fn is_refusal(error: &kube::Error) -> bool {
    match error {
        kube::Error::Api(status) => {
            (400..500).contains(&status.code) && status.code != 409 && status.code != 429
        }
        _ => false,
    }
}

/// Whether an API error means the object does not exist.
pub fn is_not_found(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == 404)
}

/// The message of an API error, without the surrounding wrapper text.
pub fn api_message(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) => status.message.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_error(code: u16) -> kube::Error {
        kube::Error::Api(Box::new(kube::core::Status {
            code,
            message: format!("status {code}"),
            ..Default::default()
        }))
    }

    #[test]
    fn only_final_refusals_skip_the_retry() {
        assert!(is_refusal(&api_error(422)));
        assert!(is_refusal(&api_error(403)));
        assert!(!is_refusal(&api_error(409)), "conflicts resolve on retry");
        assert!(!is_refusal(&api_error(429)), "throttling resolves on retry");
        assert!(!is_refusal(&api_error(500)));
        assert!(is_not_found(&api_error(404)));
        assert_eq!(api_message(&api_error(422)), "status 422");
        assert_eq!(Error::Kube(api_error(500)).metric_label(), "kube");
    }
}
