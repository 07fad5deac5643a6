//! Credentials out of the URLs cameras hand us.
//!
//! Cameras often answer GetStreamUri with `rtsp://admin:secret@host/...` (and some put userinfo
//! in their XAddrs or media service addresses). Those URLs end up in Instance properties, broker
//! env, diagnostics and logs, so every URL taken from a camera goes through [`strip_userinfo`]
//! first. Parsing is the `url` crate's (reqwest re-exports it as `reqwest::Url`), so `@` inside a
//! password, percent-encoding and IPv6 literals are handled the way URL parsers agree on.

use reqwest::Url;

/// Why a URL from a camera was not kept. The messages never repeat the URL: it may hold the
/// very credentials this module removes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("not an absolute URL")]
    Invalid,
    #[error("the URL has no host")]
    NoHost,
    #[error("the URL contains the camera's password")]
    ContainsPassword,
}

/// The URL without `user[:password]@`. A URL without userinfo is returned exactly as given
/// (only trimmed), so Akri-compatible properties such as `ONVIF_DEVICE_SERVICE_URL` keep the
/// camera's spelling; one with userinfo is re-serialised by the parser.
pub fn strip_userinfo(raw: &str) -> Result<String, UrlError> {
    let raw = raw.trim();
    let mut url = Url::parse(raw).map_err(|_| UrlError::Invalid)?;
    if url.cannot_be_a_base() {
        // `rtsp:admin:pw@host` and the like: no authority to strip, nothing a client could use.
        return Err(UrlError::Invalid);
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(UrlError::NoHost);
    }
    if url.username().is_empty() && url.password().is_none() {
        return Ok(raw.to_string());
    }
    url.set_password(None).map_err(|_| UrlError::Invalid)?;
    url.set_username("").map_err(|_| UrlError::Invalid)?;
    Ok(url.to_string())
}

/// [`strip_userinfo`], and refused when the camera's password (one we hold for it) still appears
/// elsewhere in the URL: some firmwares put `user=admin&password=...` in the path or query of
/// their stream URIs. Such a URI cannot be published without the password, so it is not
/// published. Passwords shorter than [`MIN_PASSWORD_MATCH`] are not searched for (a one-digit
/// password would match every address).
pub fn strip_credentials(raw: &str, password: Option<&str>) -> Result<String, UrlError> {
    let url = strip_userinfo(raw)?;
    if let Some(pw) = password.filter(|p| p.chars().count() >= MIN_PASSWORD_MATCH) {
        // As written, and in the query as decoded by the url crate (`pwd=p%40ss`).
        let in_query = Url::parse(&url).is_ok_and(|u| {
            u.query_pairs()
                .any(|(k, v)| k.contains(pw) || v.contains(pw))
        });
        if url.contains(pw) || in_query {
            return Err(UrlError::ContainsPassword);
        }
    }
    Ok(url)
}

/// Shortest password looked for inside URLs by [`strip_credentials`].
pub const MIN_PASSWORD_MATCH: usize = 4;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn userinfo_is_removed() {
        let cases = [
            (
                "rtsp://admin:secret@10.0.0.5:554/Streaming/Channels/101?transportmode=unicast",
                "rtsp://10.0.0.5:554/Streaming/Channels/101?transportmode=unicast",
            ),
            ("rtsp://admin@10.0.0.5/live", "rtsp://10.0.0.5/live"),
            ("rtsp://:secret@10.0.0.5/live", "rtsp://10.0.0.5/live"),
            // The last `@` ends the userinfo; a password may contain `@` and `:`.
            ("rtsp://admin:p@ss:w0rd@cam.local/x", "rtsp://cam.local/x"),
            (
                "rtsp://ad%3Amin:s%40cret@[fd00::5]:8554/x",
                "rtsp://[fd00::5]:8554/x",
            ),
            (
                "http://admin:secret@10.0.0.5:8080/onvif/device_service",
                "http://10.0.0.5:8080/onvif/device_service",
            ),
            ("  rtsp://u:p@h/  ", "rtsp://h/"),
        ];
        for (raw, want) in cases {
            let got = strip_userinfo(raw).expect(raw);
            assert_eq!(got, want, "{raw}");
            assert!(!got.contains("secret") && !got.contains('@'), "{got}");
        }
    }

    #[test]
    fn urls_without_userinfo_are_kept_verbatim() {
        for raw in [
            "http://10.0.0.5:80/onvif/device_service",
            "rtsp://10.0.0.5:554/live?a=1&b=%41",
            "http://[fd00:254:70::10]:8080/onvif/device_service",
        ] {
            assert_eq!(strip_userinfo(raw).as_deref(), Ok(raw));
        }
    }

    #[test]
    fn unusable_urls_are_refused_without_echoing_them() {
        for raw in [
            "",
            "not a url",
            "rtsp:admin:secret@host",
            "rtsp://admin:secret@/x",
        ] {
            let e = strip_userinfo(raw).expect_err(raw);
            assert!(!e.to_string().contains("secret"), "{e}");
        }
    }

    #[test]
    fn a_password_outside_the_userinfo_refuses_the_url() {
        let pw = Some("tlJwpbo6");
        assert_eq!(
            strip_credentials(
                "rtsp://10.0.0.5:554/user=admin_password=tlJwpbo6_channel=1_stream=0.sdp",
                pw
            ),
            Err(UrlError::ContainsPassword)
        );
        assert_eq!(
            strip_credentials("rtsp://10.0.0.5/live?pwd=tlJw%70bo6", pw),
            Err(UrlError::ContainsPassword)
        );
        assert_eq!(
            strip_credentials("rtsp://admin:tlJwpbo6@10.0.0.5/live", pw).as_deref(),
            Ok("rtsp://10.0.0.5/live")
        );
        // Short passwords are not searched for: "1" is in every address.
        assert_eq!(
            strip_credentials("rtsp://10.0.0.1/live", Some("1")).as_deref(),
            Ok("rtsp://10.0.0.1/live")
        );
    }
}
