//! `GET /`: the stats page, one self-contained HTML file (`stats.html`: inline CSS and JS, no
//! external asset) built into the binary. The page itself fetches `/status` every few seconds
//! and renders it; this module only serves the bytes.
//! Must not: build the page from live data (that is `/status`'s job, so the page and the JSON
//! can never disagree), or reference anything outside the admin endpoint.

/// The page, as written in `src/admin/stats.html`.
pub const PAGE: &str = include_str!("stats.html");

/// Its content type.
pub const CONTENT_TYPE: &str = "text/html; charset=utf-8";

/// The page's body, for the router.
pub fn html() -> String {
    PAGE.to_string()
}

#[cfg(test)]
mod tests {
    use super::PAGE;

    /// Nothing on the page is fetched from elsewhere: no absolute or protocol-relative URL, no
    /// `src`/`href` but the inline empty favicon, no CSS import, and a CSP that forbids it all.
    #[test]
    fn the_page_references_nothing_outside_itself() {
        let lower = PAGE.to_ascii_lowercase();
        for needle in [
            "http://", "https://", "\"//", "'//", "@import", "url(", " src=",
        ] {
            assert!(!lower.contains(needle), "the page contains {needle:?}");
        }
        let hrefs: Vec<&str> = lower
            .match_indices("href=")
            .map(|(i, _)| &lower[i..i + 13])
            .collect();
        assert_eq!(hrefs, ["href=\"data:,\""], "only the empty inline favicon");
        assert!(lower.contains("content-security-policy\" content=\"default-src 'none';"));
        assert!(lower.contains("connect-src 'self'"));
    }

    /// The page reads `/status` relative to itself, and never inserts text as HTML.
    #[test]
    fn the_page_fetches_status_and_inserts_text_only() {
        assert!(PAGE.contains("fetch(\"status\""));
        for needle in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
        ] {
            assert!(!PAGE.contains(needle), "the page uses {needle}");
        }
    }
}
