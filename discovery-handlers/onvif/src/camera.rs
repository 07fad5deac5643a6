//! Describing one camera through its device service: identity, MAC, media profiles, stream URIs.

use std::sync::Arc;
use std::time::Duration;

use oxvif::client::OnvifClient;
use oxvif::error::OnvifError;
use oxvif::soap::SoapError;
use oxvif::transport::{Transport, TransportError};
use tracing::instrument::WithSubscriber;

use crate::redact;
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
) -> Result<Arc<dyn Transport>, DescribeError> {
    BoundedTransport::new(
        timeout,
        creds.map(|c| (c.username.as_str(), c.password.as_str())),
    )
    .map(|t| Arc::new(t) as Arc<dyn Transport>)
    .map_err(|e| DescribeError::Unreachable(e.to_string()))
}

/// Runs one oxvif call with tracing switched off. oxvif logs every SOAP request and response
/// at trace level: requests carry the WS-Security username, nonce and password digest (enough
/// to guess a weak password offline), responses carry stream URIs with the camera's
/// `user:pass@`. `RUST_LOG=trace` must not print credentials, so those events never reach the
/// subscriber; our own debug lines around the calls say what failed.
async fn quiet<T>(call: impl std::future::Future<Output = T>) -> T {
    call.with_subscriber(tracing::subscriber::NoSubscriber::default())
        .await
}

/// A URL the camera returned, without credentials (see [`redact`]); `None` (with a debug line
/// that does not repeat the URL) when it cannot be published.
fn clean_url(url: &str, what: &str, creds: Option<&Credentials>) -> Option<String> {
    match redact::strip_credentials(url, creds.map(|c| c.password.as_str())) {
        Ok(u) => Some(clip(&u)),
        Err(e) => {
            tracing::debug!(what, error = %e, "URL from the camera not used");
            None
        }
    }
}

/// Queries the camera at `url`. `creds` come from discoveryProperties (or none).
pub async fn describe(
    url: &str,
    creds: Option<&Credentials>,
    timeout: Duration,
) -> Result<Description, DescribeError> {
    describe_with(
        url,
        creds,
        transport(timeout, None)?,
        transport(timeout, creds)?,
    )
    .await
}

/// [`describe`] over the given transports: `anon` for GetSystemDateAndTime, `authed` (HTTP
/// digest with `creds`) for the rest. Unit tests and the `onvif_soap_parse` fuzz target pass
/// canned replies ([`crate::transport::Canned`]) and so run exactly the parsing production runs.
pub async fn describe_with(
    url: &str,
    creds: Option<&Credentials>,
    anon: Arc<dyn Transport>,
    authed: Arc<dyn Transport>,
) -> Result<Description, DescribeError> {
    // GetSystemDateAndTime needs no auth: reachability, and the clock offset WS-Security needs.
    let anon = OnvifClient::new(url).with_transport(anon);
    let offset = match quiet(anon.get_system_date_and_time()).await {
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
    let client = client.with_transport(authed);
    let info = quiet(client.get_device_info())
        .await
        .map_err(|e| classify(e, creds))?;
    let mac = match quiet(client.get_network_interfaces()).await {
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
    let (media1, media2) = media_urls(&client, creds).await;
    let mut streams = Vec::new();
    if let Some(m2) = &media2 {
        match quiet(client.get_profiles_media2(m2)).await {
            Ok(profiles) => {
                for p in profiles.iter().take(MAX_PROFILES) {
                    match quiet(client.get_stream_uri_media2(m2, &p.token)).await {
                        Ok(uri) => {
                            if let Some(uri) = clean_url(&uri, "Media2 stream URI", creds) {
                                streams.push((clip(&p.token), uri));
                            }
                        }
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
        let profiles = quiet(client.get_profiles(m1))
            .await
            .map_err(|e| classify(e, creds))?;
        for p in profiles.iter().take(MAX_PROFILES) {
            match quiet(client.get_stream_uri(m1, &p.token)).await {
                Ok(uri) => {
                    if let Some(uri) = clean_url(&uri.uri, "stream URI", creds) {
                        streams.push((clip(&p.token), uri));
                    }
                }
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

/// Media1 and Media2 service addresses, from GetServices or else GetCapabilities, without
/// userinfo (reqwest would send it as HTTP Basic auth, and errors would show it).
async fn media_urls(
    client: &OnvifClient,
    creds: Option<&Credentials>,
) -> (Option<String>, Option<String>) {
    if let Ok(services) = quiet(client.get_services()).await {
        let find = |ns: &str| {
            services
                .iter()
                .find(|s| s.namespace.trim() == ns && !s.url.is_empty())
                .and_then(|s| clean_url(&s.url, "media service address", creds))
        };
        let m1 = find("http://www.onvif.org/ver10/media/wsdl");
        let m2 = find("http://www.onvif.org/ver20/media/wsdl");
        if m1.is_some() || m2.is_some() {
            return (m1, m2);
        }
    }
    match quiet(client.get_capabilities()).await {
        Ok(c) => {
            let clean =
                |u: Option<String>| u.and_then(|u| clean_url(&u, "media service address", creds));
            (clean(c.media.url), clean(c.media2.url))
        }
        Err(e) => {
            tracing::debug!(url = client.device_url(), error = %e, "GetCapabilities failed");
            (None, None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::Canned;

    /// The soap responder's canned replies (tests/peers/replies), filled in as it does.
    fn reply(name: &str, token: &str) -> String {
        let text = match name {
            "GetSystemDateAndTime" => {
                include_str!("../tests/peers/replies/GetSystemDateAndTime.xml")
            }
            "GetDeviceInformation" => {
                include_str!("../tests/peers/replies/GetDeviceInformation.xml")
            }
            "GetNetworkInterfaces" => {
                include_str!("../tests/peers/replies/GetNetworkInterfaces.xml")
            }
            "GetServices" => include_str!("../tests/peers/replies/GetServices.xml"),
            "GetProfiles.media1" => include_str!("../tests/peers/replies/GetProfiles.media1.xml"),
            "GetStreamUri.media1" => include_str!("../tests/peers/replies/GetStreamUri.media1.xml"),
            "GetProfiles.media2" => include_str!("../tests/peers/replies/GetProfiles.media2.xml"),
            "GetStreamUri.media2" => include_str!("../tests/peers/replies/GetStreamUri.media2.xml"),
            other => panic!("no reply {other}"),
        };
        [
            ("{{host}}", "10.0.0.5:8081"),
            ("{{rtsp_host}}", "10.0.0.5:8554"),
            ("{{ip}}", "10.0.0.5"),
            ("{{mac}}", "02:5E:00:00:00:42"),
            ("{{userinfo}}", "admin:pa55word@"),
            ("{{token}}", token),
            ("{{year}}", "2026"),
            ("{{month}}", "1"),
            ("{{day}}", "2"),
            ("{{hour}}", "3"),
            ("{{minute}}", "4"),
            ("{{second}}", "5"),
        ]
        .into_iter()
        .fold(text.to_string(), |t, (k, v)| t.replace(k, v))
    }

    const DEV: &str = "http://www.onvif.org/ver10/device/wsdl/";
    const M1: &str = "http://www.onvif.org/ver10/media/wsdl/";
    const M2: &str = "http://www.onvif.org/ver20/media/wsdl/";

    fn camera(media2: bool) -> Canned {
        let mut replies: Vec<(String, String)> = [
            "GetSystemDateAndTime",
            "GetDeviceInformation",
            "GetNetworkInterfaces",
            "GetServices",
        ]
        .into_iter()
        .map(|a| (format!("{DEV}{a}"), reply(a, "")))
        .collect();
        replies.push((format!("{M1}GetProfiles"), reply("GetProfiles.media1", "")));
        // Canned replies cannot see the token asked for; one profile per service suffices.
        replies.push((
            format!("{M1}GetStreamUri"),
            reply("GetStreamUri.media1", "media1_main"),
        ));
        if media2 {
            replies.push((format!("{M2}GetProfiles"), reply("GetProfiles.media2", "")));
            replies.push((
                format!("{M2}GetStreamUri"),
                reply("GetStreamUri.media2", "main2"),
            ));
        }
        Canned {
            replies,
            ..Canned::default()
        }
    }

    fn creds(password: &str) -> Credentials {
        Credentials {
            username: "admin".into(),
            password: password.into(),
            source: "username_default/password_default".into(),
        }
    }

    async fn run(t: Canned, creds: Option<&Credentials>) -> Result<Description, DescribeError> {
        describe_with(
            "http://10.0.0.5:8081/onvif/device_service",
            creds,
            Arc::new(t.clone()),
            Arc::new(t),
        )
        .await
    }

    #[tokio::test]
    async fn media2_streams_mac_and_identity_without_userinfo() {
        let c = creds("pa55word");
        let d = run(camera(true), Some(&c)).await.expect("described");
        assert_eq!(
            (
                d.manufacturer.as_str(),
                d.model.as_str(),
                d.firmware.as_str(),
                d.serial.as_str()
            ),
            ("VergeSOAP", "Media2-Digest", "2.4.1", "SOAP-0042")
        );
        // The enabled interface's MAC, lower case; the disabled one listed first is skipped.
        assert_eq!(d.mac.as_deref(), Some("02:5e:00:00:00:42"));
        assert_eq!(
            d.streams,
            [
                (
                    "main2".to_string(),
                    "rtsp://10.0.0.5:8554/main2".to_string()
                ),
                ("sub2".to_string(), "rtsp://10.0.0.5:8554/main2".to_string()),
            ]
        );
        assert!(!format!("{d:?}").contains("pa55word"));
    }

    #[tokio::test]
    async fn media1_when_media2_is_not_offered() {
        let d = run(camera(false), None).await.expect("described");
        assert_eq!(
            d.streams,
            [(
                "media1_main".to_string(),
                "rtsp://10.0.0.5:8554/media1_main".to_string()
            )]
        );
    }

    #[tokio::test]
    async fn a_stream_uri_with_the_password_in_its_path_is_not_published() {
        let mut t = camera(false);
        let body = reply(
            "GetStreamUri.media1",
            "user=admin_password=pa55word_channel=1",
        );
        t.replies
            .retain(|(a, _)| !a.ends_with("media/wsdl/GetStreamUri"));
        t.replies.push((format!("{M1}GetStreamUri"), body));
        let d = run(t, Some(&creds("pa55word"))).await.expect("described");
        assert!(d.streams.is_empty(), "{:?}", d.streams);
    }

    #[tokio::test]
    async fn rejected_credentials_name_their_source() {
        let t = Canned {
            unauthorized: true,
            ..camera(true)
        };
        let anon = Arc::new(camera(true));
        let e = describe_with(
            "http://10.0.0.5:8081/onvif/device_service",
            Some(&creds("wrong")),
            anon.clone(),
            Arc::new(t.clone()),
        )
        .await
        .expect_err("rejected");
        assert_eq!(
            e,
            DescribeError::CredentialsRejected("username_default/password_default".into())
        );
        let e = describe_with("http://x/", None, anon, Arc::new(t))
            .await
            .expect_err("required");
        assert_eq!(e, DescribeError::CredentialsRequired);
    }

    /// The fuzz target answers every call with one body; one holding every response element
    /// walks the whole description (so fuzzing reaches every typed parser).
    #[tokio::test]
    async fn one_body_with_every_response_describes_the_camera() {
        let inner = |name: &str, token: &str| {
            let r = reply(name, token);
            let start = r.find("<SOAP-ENV:Body>").expect("body") + "<SOAP-ENV:Body>".len();
            let end = r.find("</SOAP-ENV:Body>").expect("end");
            r[start..end].to_string()
        };
        let all: String = [
            ("GetSystemDateAndTime", ""),
            ("GetDeviceInformation", ""),
            ("GetNetworkInterfaces", ""),
            ("GetServices", ""),
            ("GetProfiles.media2", ""),
            ("GetStreamUri.media2", "main2"),
        ]
        .iter()
        .map(|(n, t)| inner(n, t))
        .collect();
        let head = reply("GetDeviceInformation", "");
        let head = &head[..head.find("<SOAP-ENV:Body>").expect("body")];
        let body = format!("{head}<SOAP-ENV:Body>{all}</SOAP-ENV:Body></SOAP-ENV:Envelope>");
        let d = run(Canned::always(body), Some(&creds("pa55word")))
            .await
            .expect("described");
        assert_eq!(d.model, "Media2-Digest");
        assert_eq!(d.mac.as_deref(), Some("02:5e:00:00:00:42"));
        assert_eq!(d.streams.len(), 2);
        assert!(
            d.streams
                .iter()
                .all(|(_, u)| u == "rtsp://10.0.0.5:8554/main2")
        );
    }

    #[tokio::test]
    async fn garbage_replies_are_errors_not_panics() {
        for body in ["", "<<<", "<Envelope><Body/></Envelope>", "\u{0}\u{ffff}"] {
            let e = run(Canned::always(body), None).await.expect_err(body);
            assert!(matches!(e, DescribeError::Protocol(_)), "{body:?}: {e:?}");
        }
    }
}
