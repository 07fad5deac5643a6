//! Describing one camera through its device service: identity, MAC, media profiles, stream URIs.

use std::sync::Arc;
use std::time::Duration;

use oxvif::client::OnvifClient;
use oxvif::error::OnvifError;
use oxvif::soap::SoapError;
use oxvif::transport::TransportError;

use crate::transport::BoundedTransport;

/// Profiles described per camera (each costs a GetStreamUri).
pub const MAX_PROFILES: usize = 16;
/// Longest identity string kept (manufacturer, model, firmware, serial, URIs).
pub const MAX_FIELD_LEN: usize = 512;

/// Credentials for one camera. `Debug` never shows the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
    /// The discoveryProperties name the username came from (for messages).
    pub source: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// What the device service told us.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Description {
    pub manufacturer: String,
    pub model: String,
    pub firmware: String,
    pub serial: String,
    pub mac: Option<String>,
    /// (profile token, RTSP URI), main profile first.
    pub streams: Vec<(String, String)>,
}

/// Why a camera could not be described.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DescribeError {
    #[error("device service unreachable: {0}")]
    Unreachable(String),
    #[error("the camera requires credentials and none are configured")]
    CredentialsRequired,
    #[error("the camera rejected the credentials from {0}")]
    CredentialsRejected(String),
    #[error("unexpected reply: {0}")]
    Protocol(String),
}

fn clip(s: &str) -> String {
    s.chars().take(MAX_FIELD_LEN).collect()
}

fn is_auth_error(e: &OnvifError) -> bool {
    match e {
        OnvifError::Transport(TransportError::HttpStatus { status, .. }) => {
            matches!(status, 401 | 403)
        }
        OnvifError::Soap(SoapError::Fault {
            code,
            reason,
            subcode,
            ..
        }) => {
            let all = format!("{code} {reason} {}", subcode.as_deref().unwrap_or(""))
                .to_ascii_lowercase();
            all.contains("notauthorized")
                || all.contains("not authorized")
                || all.contains("unauthorized")
                || all.contains("authority")
        }
        _ => false,
    }
}

fn classify(e: OnvifError, creds: Option<&Credentials>) -> DescribeError {
    if is_auth_error(&e) {
        return match creds {
            Some(c) => DescribeError::CredentialsRejected(c.source.clone()),
            None => DescribeError::CredentialsRequired,
        };
    }
    match e {
        OnvifError::Transport(t) => DescribeError::Unreachable(clip(&t.to_string())),
        other => DescribeError::Protocol(clip(&other.to_string())),
    }
}

fn transport(
    timeout: Duration,
    creds: Option<&Credentials>,
) -> Result<Arc<BoundedTransport>, DescribeError> {
    BoundedTransport::new(
        timeout,
        creds.map(|c| (c.username.as_str(), c.password.as_str())),
    )
    .map(Arc::new)
    .map_err(|e| DescribeError::Unreachable(e.to_string()))
}

/// Queries the camera at `url`. `creds` come from discoveryProperties (or none).
pub async fn describe(
    url: &str,
    creds: Option<&Credentials>,
    timeout: Duration,
) -> Result<Description, DescribeError> {
    // GetSystemDateAndTime needs no auth: reachability, and the clock offset WS-Security needs.
    let anon = OnvifClient::new(url).with_transport(transport(timeout, None)?);
    let offset = match anon.get_system_date_and_time().await {
        Ok(t) => t.utc_offset_secs(),
        Err(e) if is_auth_error(&e) => 0,
        Err(e) => return Err(classify(e, None)),
    };
    let mut client = OnvifClient::new(url);
    if let Some(c) = creds {
        client = client
            .with_credentials(c.username.clone(), c.password.clone())
            .with_utc_offset(offset);
    }
    let client = client.with_transport(transport(timeout, creds)?);
    let info = client
        .get_device_info()
        .await
        .map_err(|e| classify(e, creds))?;
    let mac = match client.get_network_interfaces().await {
        Ok(ifs) => ifs
            .iter()
            .filter(|i| i.enabled)
            .chain(ifs.iter())
            .map(|i| i.hw_address.trim().to_ascii_lowercase())
            .find(|m| !m.is_empty() && m.len() <= 64),
        Err(e) => {
            tracing::debug!(url, error = %e, "GetNetworkInterfaces failed");
            None
        }
    };
    let (media1, media2) = media_urls(&client).await;
    let mut streams = Vec::new();
    if let Some(m2) = &media2 {
        match client.get_profiles_media2(m2).await {
            Ok(profiles) => {
                for p in profiles.iter().take(MAX_PROFILES) {
                    match client.get_stream_uri_media2(m2, &p.token).await {
                        Ok(uri) => streams.push((clip(&p.token), clip(&uri))),
                        Err(e) => {
                            tracing::debug!(url, profile = %p.token, error = %e, "Media2 GetStreamUri failed")
                        }
                    }
                }
            }
            Err(e) => tracing::debug!(url, error = %e, "Media2 GetProfiles failed; trying Media1"),
        }
    }
    if streams.is_empty()
        && let Some(m1) = &media1
    {
        let profiles = client
            .get_profiles(m1)
            .await
            .map_err(|e| classify(e, creds))?;
        for p in profiles.iter().take(MAX_PROFILES) {
            match client.get_stream_uri(m1, &p.token).await {
                Ok(uri) => streams.push((clip(&p.token), clip(&uri.uri))),
                Err(e) => {
                    tracing::debug!(url, profile = %p.token, error = %e, "GetStreamUri failed")
                }
            }
        }
    }
    Ok(Description {
        manufacturer: clip(&info.manufacturer),
        model: clip(&info.model),
        firmware: clip(&info.firmware_version),
        serial: clip(&info.serial_number),
        mac,
        streams,
    })
}

/// Media1 and Media2 service addresses, from GetServices or else GetCapabilities.
async fn media_urls(client: &OnvifClient) -> (Option<String>, Option<String>) {
    if let Ok(services) = client.get_services().await {
        let find = |ns: &str| {
            services
                .iter()
                .find(|s| s.namespace.trim() == ns && !s.url.is_empty())
                .map(|s| s.url.clone())
        };
        let m1 = find("http://www.onvif.org/ver10/media/wsdl");
        let m2 = find("http://www.onvif.org/ver20/media/wsdl");
        if m1.is_some() || m2.is_some() {
            return (m1, m2);
        }
    }
    match client.get_capabilities().await {
        Ok(c) => (c.media.url, c.media2.url),
        Err(e) => {
            tracing::debug!(url = client.device_url(), error = %e, "GetCapabilities failed");
            (None, None)
        }
    }
}
