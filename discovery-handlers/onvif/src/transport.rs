//! oxvif's `Transport` with bounds: a total timeout per request and a cap on the response size.
//!
//! oxvif's own `HttpTransport` reads whole bodies into memory (a hostile camera could send
//! gigabytes within its timeout), so this one reads at most [`MAX_SOAP_RESPONSE`] bytes.
//! HTTP digest (for cameras that ask for it) goes through diqwest, as in oxvif.

use std::time::Duration;

use async_trait::async_trait;
use diqwest::WithDigestAuth;
use oxvif::transport::{Transport, TransportError};

/// Largest SOAP response read; GetProfiles of a busy camera is a few tens of KiB.
pub const MAX_SOAP_RESPONSE: usize = 1024 * 1024;
/// Status used in [`TransportError::HttpStatus`] for a response cut at [`MAX_SOAP_RESPONSE`].
pub const STATUS_TOO_LARGE: u16 = 0;

/// A bounded HTTP transport for one camera.
pub struct BoundedTransport {
    client: reqwest::Client,
    digest: Option<diqwest::DigestAuthSession>,
}

impl BoundedTransport {
    /// A transport whose requests time out after `timeout`, with HTTP digest if credentials are given.
    pub fn new(
        timeout: Duration,
        credentials: Option<(&str, &str)>,
    ) -> Result<Self, TransportError> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self {
            client,
            digest: credentials.map(|(u, p)| diqwest::DigestAuthSession::new(u, p)),
        })
    }
}

#[async_trait]
impl Transport for BoundedTransport {
    async fn soap_post(
        &self,
        url: &str,
        action: &str,
        body: String,
    ) -> Result<String, TransportError> {
        let content_type = format!("application/soap+xml; charset=utf-8; action=\"{action}\"");
        let request = self
            .client
            .post(url)
            .header("Content-Type", content_type)
            .body(body);
        let mut response = match &self.digest {
            Some(session) => request
                .send_digest_auth(session)
                .await
                .map_err(|e| match e {
                    diqwest::error::Error::Reqwest(e) => TransportError::Http(e),
                    other => TransportError::HttpStatus {
                        status: 401,
                        body: other.to_string(),
                    },
                })?,
            None => request.send().await?,
        };
        let status = response.status().as_u16();
        let mut bytes = Vec::new();
        while let Some(chunk) = response.chunk().await? {
            if bytes.len() + chunk.len() > MAX_SOAP_RESPONSE {
                return Err(TransportError::HttpStatus {
                    status: STATUS_TOO_LARGE,
                    body: format!("response larger than {MAX_SOAP_RESPONSE} bytes"),
                });
            }
            bytes.extend_from_slice(&chunk);
        }
        let text = String::from_utf8_lossy(&bytes).into_owned();
        // SOAP faults come as 400 or 500; the SOAP layer reads them.
        if matches!(status, 200 | 400 | 500) {
            Ok(text)
        } else {
            Err(TransportError::HttpStatus {
                status,
                body: text.chars().take(200).collect(),
            })
        }
    }
}

/// Replies from memory, by SOAP action: the unit tests and the `onvif_soap_parse` fuzz target
/// drive [`crate::camera::describe_with`] through it, so they exercise the same oxvif parsing of
/// the same bodies that production applies to what a camera sends.
#[derive(Clone, Debug, Default)]
pub struct Canned {
    /// (SOAP action URI, response body).
    pub replies: Vec<(String, String)>,
    /// Body for any action not in `replies`; without one such a request gets HTTP 404.
    pub fallback: Option<String>,
    /// Answer every request with HTTP 401 (a camera that wants other credentials).
    pub unauthorized: bool,
}

impl Canned {
    /// The same body for every request.
    pub fn always(body: impl Into<String>) -> Self {
        Self {
            fallback: Some(body.into()),
            ..Self::default()
        }
    }
}

#[async_trait]
impl Transport for Canned {
    async fn soap_post(
        &self,
        _url: &str,
        action: &str,
        _body: String,
    ) -> Result<String, TransportError> {
        if self.unauthorized {
            return Err(TransportError::HttpStatus {
                status: 401,
                body: String::new(),
            });
        }
        self.replies
            .iter()
            .find(|(a, _)| a == action)
            .map(|(_, b)| b.clone())
            .or_else(|| self.fallback.clone())
            .ok_or_else(|| TransportError::HttpStatus {
                status: 404,
                body: String::new(),
            })
    }
}
